"""The dashboard's Service page (``dashboard/service_page.py``, data in ``dashboard/service_metrics.py``): the
service's ``/metrics`` snapshot, made by the service's own ``ServiceMetrics``, as figures, tables and charts; the
notices where the service or its metrics cannot be read."""
from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from test_dashboard_pages import DASH, TIMEOUT, StubClient, all_text
from vlmguard.client import APIError
from vlmguard.dashboard import service_metrics as sm
from vlmguard.dashboard.service import CLIENT_KEY
from vlmguard.workers.metrics import ServiceMetrics


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    from test_dashboard_pages import quiet_env

    quiet_env(monkeypatch, tmp_path)


def busy_service() -> dict:
    """A snapshot of a service that answered 7 requests (5 chat, one refused, one failed), batched 1 and 4."""
    m = ServiceMetrics()
    for route, status, latency in [("/v1/chat/completions", 200, 0.03)] * 4 + [
            ("/v1/chat/completions", 200, 0.7), ("/v1/chat/completions", 400, 0.001), ("/v1/responses", 503, 0.01)]:
        m.request_started()
        m.request_finished(route, status, latency)
    for batch, prefill in [(1, 1), (4, 4), (4, 2), (4, 2), (4, 4)]:
        m.observe_result({"token_ids": [1, 2, 3], "prompt_tokens": 40, "visual_tokens": 16,
                          "visual_tokens_kept": [16, 16, 4, 4],
                          "timings": {"decode_s": 0.01, "batch_size": batch, "prefill_batch": prefill}})
    m.observe_failure()
    m.replica_resent()
    m.replica_resent()
    m.background_taken_over()
    return m.snapshot()


class MetricsClient(StubClient):
    def __init__(self, snapshot: dict | None = None, fail: Exception | None = None):
        super().__init__()
        self.snapshot, self.error = snapshot, fail

    def metrics(self):
        if self.error is not None:
            raise self.error
        return self.snapshot


def _page(client) -> AppTest:
    at = AppTest.from_file(str(DASH / "service_page.py"), default_timeout=TIMEOUT)
    at.session_state[CLIENT_KEY] = client
    return at.run()


def _figures(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def test_service_page_shows_the_snapshot():
    at = _page(MetricsClient(busy_service()))
    assert not at.exception and [t.value for t in at.title] == ["Service"]
    assert "tiny-llava" in all_text(at)  # (the service's caption)
    figures = _figures(at)
    assert figures["requests"] == "7" and figures["in flight"] == "0" and figures["server errors"] == "1"
    assert figures["answers"] == "5" and figures["mean batch"] == "3.40" and figures["largest batch"] == "4"
    assert figures["visual tokens kept"] == "10.0 of 16.0" and figures["prompt tokens"] == "200"
    assert figures["failed answers"] == "1" and figures["replica resends"] == "2"
    assert figures["background taken over"] == "1" and figures["mean latency"] == "0.164 s"
    routes = at.table[0].value.reset_index()
    assert routes.to_dict("records")[0] == {"route": "/v1/chat/completions", "status": 200, "requests": 5}
    assert len(routes) == 3
    batches = at.table[1].value.reset_index()
    assert batches.to_dict("records") == [{"requests together": 1, "decoded": 1, "prefilled": 1},
                                          {"requests together": 2, "decoded": 0, "prefilled": 2},
                                          {"requests together": 4, "decoded": 4, "prefilled": 2}]
    assert len(at.get("vega_lite_chart")) == 2  # latency and batching


def test_service_page_of_a_service_that_answered_nothing():
    at = _page(MetricsClient(ServiceMetrics().snapshot()))
    assert not at.exception
    text = all_text(at)
    assert "No request answered yet" in text and "No successful request yet" in text and "No answer yet" in text
    assert _figures(at)["requests"] == "0" and _figures(at)["mean latency"] == "–"


def test_service_page_when_metrics_fail_or_no_service():
    at = _page(MetricsClient(fail=APIError(401, "invalid API key")))
    assert not at.exception and "could not be read" in at.error[0].value and "invalid API key" in at.error[0].value

    at = AppTest.from_file(str(DASH / "service_page.py"), default_timeout=TIMEOUT).run()  # nothing listens
    assert not at.exception and "not reachable" in " ".join(w.value for w in at.warning)


def test_live_refresh_can_be_turned_off():
    at = _page(MetricsClient(busy_service()))
    at.toggle(key="svc_live").set_value(False).run()
    assert not at.exception and _figures(at)["requests"] == "7"


def test_latency_histogram_from_cumulative_buckets():
    hist = sm.latency_histogram(busy_service())
    counts = dict(zip(hist["bucket"], hist["requests"]))
    assert counts["≤ 0.05 s"] == 4 and counts["≤ 1 s"] == 1 and counts["> 120 s"] == 0  # (4 fast, one 0.7 s)
    assert hist["requests"].sum() == 5 and list(hist["bucket"])[:2] == ["≤ 0.05 s", "≤ 0.1 s"]


def test_figures_of_an_empty_snapshot_and_durations():
    empty = ServiceMetrics().snapshot()
    assert sm.requests_table(empty).empty and sm.batch_table(empty).empty
    assert sm.latency_histogram(empty)["requests"].sum() == 0
    assert [sm._duration(s) for s in (5, 125, 7300, 90000)] == ["5 s", "2 min 5 s", "2 h 1 min", "1 d 1 h"]
