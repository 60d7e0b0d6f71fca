"""The dashboard in a real browser: ``vlmguard dashboard`` started as a process on a loopback port, the HTTP
API serving a tiny random-weight LLaVA in another process, headless Debian Chromium driven by selenium.

Screenshots of the leaderboard and of the playground (after a real generation through the service) are
saved under ``test-artifacts/`` and the pages are checked for their expected text. Chromium and
chromedriver come from ``scripts/setup.d/40-chromium.sh``.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from test_dashboard_data import FIX, shared_fixture_db

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROME_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1500,2200", "--hide-scrollbars"]

# The HTTP API of vlmguard.workers around one in-process engine (no Ray), on a loopback port.
SERVICE = """
import sys, uvicorn
from vlmguard.workers.api import LocalBackend, create_api
from vlmguard.workers.config import ModelConfig, ServiceConfig
from vlmguard.workers.engine_worker import EngineWorker
port = int(sys.argv[1])
cfg = ServiceConfig(models=[ModelConfig(name="tiny-llava", model="random:llava", max_new_tokens_limit=64)],
                    api_key_env=None)
worker = EngineWorker("random:llava", name="tiny-llava", torch_threads=1, prefix_cache_mb=64)
app = create_api(LocalBackend({"tiny-llava": worker}), cfg)
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}:\n{proc.stdout.read() if proc.stdout else ''}")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{what} did not answer {url} within {timeout:.0f} s")


def _binary(*names: str) -> str | None:
    for n in names:
        p = shutil.which(n) or (f"/usr/bin/{n}" if os.path.exists(f"/usr/bin/{n}") else None)
        if p:
            return p
    return None


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = _binary("chromium", "chromium-browser"), _binary("chromedriver")
    if not chromium or not driver:
        pytest.fail("Chromium/chromedriver are missing: run `bash scripts/setup.d/40-chromium.sh` as root "
                    "(apt-get install chromium chromium-driver)")
    profile = tempfile.mkdtemp(prefix="vlmguard-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for f in CHROME_FLAGS + [f"--user-data-dir={profile}"]:
        opts.add_argument(f)
    drv = webdriver.Chrome(service=Service(executable_path=driver), options=opts)
    drv.set_page_load_timeout(60)
    try:
        yield drv
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    """(dashboard URL, service URL): both processes started here, stopped at the end."""
    db = shared_fixture_db(tmp_path_factory)
    svc_port, dash_port = free_port(), free_port()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "VLMGUARD_CACHE": str(tmp_path_factory.mktemp("cache"))}
    service = _start([sys.executable, "-c", SERVICE, str(svc_port)], env)
    vlmguard = [sys.executable, "-c", "import sys; from vlmguard.cli import main; sys.exit(main())"]
    dash = _start([*vlmguard, "dashboard", "--port", str(dash_port), "--db", str(db), "--service",
                   f"http://127.0.0.1:{svc_port}", "--jobs-address", "http://127.0.0.1:9",
                   "--image-dir", str(FIX / "images")], env)
    try:
        wait_http(f"http://127.0.0.1:{dash_port}/_stcore/health", dash, 90, "vlmguard dashboard")
        wait_http(f"http://127.0.0.1:{svc_port}/health", service, 180, "the service")
        yield f"http://127.0.0.1:{dash_port}", f"http://127.0.0.1:{svc_port}"
    finally:
        _stop(dash)
        _stop(service)


def wait_text(drv, texts: list[str], timeout: float = 60.0, lines_with: tuple[str, int] = ("", 0)) -> str:
    """Wait until the rendered page shows every text (and, with ``lines_with`` (TEXT, N), N lines holding TEXT);
    return the page's visible text."""
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    body = ""
    text, count = lines_with
    while time.monotonic() < deadline:
        try:
            body = drv.find_element(By.TAG_NAME, "body").text
        except Exception:  # noqa: BLE001 - the page is (re)loading
            body = ""
        if all(t in body for t in texts) and sum(text in ln for ln in body.splitlines()) >= count:
            return body
        time.sleep(0.5)
    missing = [t for t in texts if t not in body]
    raise AssertionError(f"page never showed {missing} (or {count} lines with {text!r}); it shows:\n{body[:3000]}")


def retried(action, timeout: float = 60.0):
    """``action()`` once the page lets it: tried again through Streamlit's re-renders (the element it needs missing,
    replaced, not yet interactable or covered) until ``timeout``."""
    from selenium.common.exceptions import (ElementClickInterceptedException, ElementNotInteractableException,
                                            NoSuchElementException, StaleElementReferenceException)

    deadline = time.monotonic() + timeout
    while True:
        try:
            return action()
        except (NoSuchElementException, StaleElementReferenceException, ElementNotInteractableException,
                ElementClickInterceptedException):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def type_into(drv, css: str, keys: str, timeout: float = 90.0) -> None:
    """Send ``keys`` to the element ``css`` selects, once the page has it and it takes them."""
    from selenium.webdriver.common.by import By

    retried(lambda: drv.find_element(By.CSS_SELECTOR, css).send_keys(keys), timeout)


def click(drv, xpath: str, timeout: float = 60.0) -> None:
    """Click the first element ``xpath`` selects, once the page has it and it takes the click."""
    from selenium.webdriver.common.by import By

    def act() -> None:
        element = drv.find_element(By.XPATH, xpath)
        drv.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
        element.click()

    retried(act, timeout)


def screenshot(drv, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    assert drv.save_screenshot(str(path)), f"screenshot {path} failed"
    assert path.stat().st_size > 10_000
    return path


def test_leaderboard_in_chromium(browser, dashboard):
    url, _ = dashboard
    browser.get(url)  # the default page
    body = wait_text(browser, ["Leaderboard", "10 of 10 runs", "Accuracy vs tokens kept", "Filters"])
    assert "Page not found" not in body
    assert "Playground" in body and "Jobs" in body  # the navigation
    wait_text(browser, ["visual tokens kept (mean)"], timeout=30)  # the tokens-kept chart's axis drew
    time.sleep(0.5)
    screenshot(browser, "dashboard-leaderboard.png")
    src = browser.page_source
    assert "stDataFrame" in src and "vega-embed" in src
    _click_tab(browser, "Pareto: accuracy / speed / hallucination")
    wait_text(browser, ["Higher accuracy, lower latency", "latency per sample (ms)"], timeout=30)
    time.sleep(0.5)
    screenshot(browser, "dashboard-pareto.png")


def _click_tab(drv, label: str) -> None:
    click(drv, f"//*[@role='tab'][contains(normalize-space(.), '{label}')]")


def test_playground_generates_through_the_service_in_chromium(browser, dashboard):
    url, service = dashboard
    browser.get(f"{url}/playground")
    wait_text(browser, ["Playground", "tiny-llava", "Generate", "render a SynthCOCO scene"], timeout=90)
    type_into(browser, 'input[aria-label^="budget"]', "\ue009a")  # Ctrl-A
    type_into(browser, 'input[aria-label^="budget"]', "6\n")
    wait_text(browser, ["Generate"])
    time.sleep(1.0)
    click(browser, "//button[normalize-space(.)='Generate']")
    body = wait_text(browser, ["with methods", "plain model", "kept visual tokens: 6 of 16",
                               "kept visual tokens: 16 of 16", "Per-token probabilities"], timeout=180)
    assert "not reachable" not in body and "Page not found" not in body
    browser.execute_script("window.scrollTo(0, document.body.scrollHeight / 3)")
    time.sleep(1.5)
    screenshot(browser, "dashboard-playground.png")
    metrics = httpx.get(f"{service}/metrics?format=json", timeout=5).json()
    assert metrics["results"] >= 2  # both columns went through the real service


def test_chat_keeps_a_conversation_through_the_service_in_chromium(browser, dashboard):
    """Two questions about one image: the second goes with the first and its answer, and the service's prefix
    cache gives it the tokens the first computed (the chat page says how many)."""
    url, service = dashboard
    browser.get(f"{url}/chat")
    wait_text(browser, ["Chat", "tiny-llava", "New conversation", "render a SynthCOCO scene"], timeout=90)
    before = httpx.get(f"{service}/metrics?format=json", timeout=5).json()["results"]
    for turn, question in enumerate(("Describe this image.", "What is on the left?"), start=1):
        type_into(browser, 'textarea[data-testid="stChatInputTextArea"]', question + "\n")
        # (each answer's caption line: the first's "none from the prefix cache" must not pass for the second's)
        body = wait_text(browser, [question], timeout=180, lines_with=("prompt tokens", turn))
    assert "Page not found" not in body and "not reachable" not in body
    lines = [ln for ln in body.splitlines() if "prompt tokens" in ln]
    assert len(lines) == 2 and "none from the prefix cache" in lines[0]
    first = int(lines[0].split(" prompt tokens")[0].split()[-1])
    found = re.search(r"(\d+) prompt tokens, (\d+) from the prefix cache", lines[1])
    assert found, lines
    second, cached = (int(x) for x in found.groups())
    # the first question's prompt as FlowCut left it at least (the random weights' answer does not read back as
    # the tokens chosen, so the second turn computes it again)
    assert second > first and 0 < cached < second
    screenshot(browser, "dashboard-chat.png")
    assert httpx.get(f"{service}/metrics?format=json", timeout=5).json()["results"] == before + 2


def test_service_page_in_chromium(browser, dashboard):
    """The Service page reads the service's /metrics: a chat request sent here is counted there."""
    url, service = dashboard
    r = httpx.post(f"{service}/v1/chat/completions", timeout=120, json={
        "model": "tiny-llava", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4})
    assert r.status_code == 200, r.text
    browser.get(f"{url}/service")
    body = wait_text(browser, ["Service", "Traffic", "Failures and recovery", "replica resends", "Requests by route",
                               "/v1/chat/completions", "Batching"], timeout=90)
    assert "Page not found" not in body and "could not be read" not in body
    wait_text(browser, ["latency of successful requests"], timeout=30)  # the latency chart drew
    time.sleep(0.5)
    screenshot(browser, "dashboard-service.png")


def test_jobs_page_without_cluster_in_chromium(browser, dashboard):
    url, _ = dashboard
    browser.get(f"{url}/jobs")
    body = wait_text(browser, ["Jobs", "Ray Jobs API is not reachable", "Leaderboard works without it"])
    assert "Page not found" not in body
    screenshot(browser, "dashboard-jobs.png")
