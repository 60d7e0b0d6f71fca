"""Every ``vlmguard ...`` command the README and docs/*.md show parses with the real parser, and every
``configs/...`` path they name exists (sweep configs load), so that a command copied from the docs runs.

Commands are taken from fenced code blocks (``\\`` continuations joined, ``# comments`` dropped) and from inline
code spans (which may wrap lines). Notation the docs use is expanded before parsing:

- ``[--flag VALUE]`` (an optional part): parsed both without and with it;
- ``a|b|c`` as one word (``perf prefill|decode``, ``--decoding vcd|vista|lqcd``): each alternative;
- ``...`` (the rest elided): dropped;
- ``N`` (a placeholder number): 1; other placeholders (``M``, ``DB``, ``DIR``, ``JOB_ID``) are taken as strings.

A few spans only name a command or a flag in running text, without the arguments it requires; they are listed in
MENTIONS with the reason, and are checked with nothing required (each subcommand, flag and choice must still
exist). MENTIONS is kept exact: each entry must still appear in the docs and must still fail the strict parse.
``job submit bench ...`` commands also have their benchmark part parsed by the job's own parser.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from vlmguard.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Spans that name a command (or a flag) in running text and deliberately leave out what it requires.
MENTIONS = {
    "vlmguard": "the project's name in running text",
    "vlmguard perf prefill|decode|prefix|chat|serve|routing|gemm|plot":
        "lists the subcommands (plot requires a report and --out)",
    "vlmguard bench": "names the command group (--decoding-param is one of its options)",
    "vlmguard synth hallucinations": "names the command (its --db is given a sentence earlier)",
    "vlmguard synth build --scene-cue 0.25": "names the option; the full build command follows in the text",
    "vlmguard synth train --scene-weight": "names the option; its value is in the text",
    "vlmguard generate ... --decoding vcd --param alpha=1.5": "'...' elides the model, image and prompt",
}

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
OPTIONAL = re.compile(r"\[(--[^\[\]]*)\]")
PLACEHOLDERS = {"N": "1"}
ALTERNATIVES = re.compile(r"^[\w.\-]+(\|[\w.\-]+)+$")


def _doc_commands() -> list[tuple[str, str]]:
    """(file:line, command text) for every ``vlmguard`` command in a code block or an inline code span."""
    found = []
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(ROOT)
        for m in FENCE.finditer(text):
            first = text[:m.start(1)].count("\n") + 1
            lines = m.group(1).split("\n")
            i = 0
            while i < len(lines):
                start, line = i, lines[i]
                while line.rstrip().endswith("\\") and i + 1 < len(lines):
                    i += 1
                    line = line.rstrip()[:-1] + " " + lines[i].strip()
                if line.strip().startswith("vlmguard"):
                    found.append((f"{rel}:{first + start}", line.strip()))
                i += 1
        # inline spans outside the code blocks (blocks blanked, keeping line numbers)
        rest = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
        for m in re.finditer(r"`([^`]+)`", rest):
            span = " ".join(m.group(1).split())
            if span == "vlmguard" or span.startswith("vlmguard "):
                found.append((f"{rel}:{rest[:m.start()].count(chr(10)) + 1}", span))
    return found


COMMANDS = _doc_commands()


def _variants(command: str) -> list[list[str]]:
    """The argv lists (without the leading ``vlmguard``) a documented command stands for."""
    texts = {OPTIONAL.sub("", command), OPTIONAL.sub(r"\1", command)}
    out = []
    for text in sorted(texts):
        words = [PLACEHOLDERS.get(w, w) for w in shlex.split(text, comments=True)[1:] if w != "..."]
        alts = [w.split("|") if ALTERNATIVES.match(w) else [w] for w in words]
        n = max((len(a) for a in alts), default=1)
        for k in range(n):
            argv = [a[min(k, len(a) - 1)] for a in alts]
            if argv not in out:
                out.append(argv)
    return out


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return build_parser()


@pytest.fixture(scope="module")
def relaxed_parser() -> argparse.ArgumentParser:
    """The real parser with nothing required (for MENTIONS): flags, subcommands and choices are still checked."""
    p = build_parser()
    todo = [p]
    while todo:
        q = todo.pop()
        for action in q._actions:
            action.required = False
            if isinstance(action, argparse._SubParsersAction):
                todo.extend(action.choices.values())
    return p


def _parse(p: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace | None, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            return p.parse_args(argv), ""
        except SystemExit:
            return None, err.getvalue().strip()


def _check_job_submit(loc: str, ns: argparse.Namespace) -> None:
    """``job submit bench ARGS``: ARGS go to the job's parser on the cluster; parse them here as it will."""
    from vlmguard.bench.sweep import load_config
    from vlmguard.workers import bench_job

    inner = [a for a in ns.bench_args if a != "--json"]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            if inner[:1] == ["sweep"]:
                args = bench_job.build_sweep_parser().parse_args(inner[1:])
            else:
                bench_job.parse_job_args(inner)
    except SystemExit:
        pytest.fail(f"{loc}: the job's parser refuses `bench {' '.join(inner)}`: {err.getvalue().strip()}")
    if inner[:1] == ["sweep"]:
        load_config(ROOT / args.config)


def test_commands_were_found():
    files = {loc.split(":")[0] for loc, _ in COMMANDS}
    assert "README.md" in files and "docs/performance.md" in files and "docs/pruning.md" in files
    assert len(COMMANDS) > 50


@pytest.mark.parametrize("loc,command", COMMANDS, ids=[loc for loc, _ in COMMANDS])
def test_documented_command_parses(loc, command, parser, relaxed_parser):
    mention = command in MENTIONS
    for argv in _variants(command):
        if mention:
            ns, err = _parse(relaxed_parser, argv)
            if ns is None and argv and argv[-1].startswith("--") and "expected one argument" in err:
                ns, err = _parse(relaxed_parser, argv + ["0"])  # a flag named without its value
        else:
            ns, err = _parse(parser, argv)
        assert ns is not None, f"{loc}: `vlmguard {' '.join(argv)}` does not parse: {err.splitlines()[-1:]}"
        if getattr(ns, "command", None) == "job" and getattr(ns, "job_command", None) == "submit":
            _check_job_submit(loc, ns)
        if getattr(ns, "command", None) == "bench" and getattr(ns, "config", None):
            from vlmguard.bench.sweep import load_config

            load_config(ROOT / ns.config)


def test_mentions_are_exact(parser):
    texts = {command for _, command in COMMANDS}
    stale = sorted(set(MENTIONS) - texts)
    assert not stale, f"MENTIONS no longer in the docs: {stale}"
    for command in MENTIONS:
        assert any(_parse(parser, argv)[0] is None for argv in _variants(command)), (
            f"{command!r} parses as it is: remove it from MENTIONS")


def _config_paths() -> list[tuple[str, str]]:
    out = []
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"(?<![\w/.])configs/[\w./\-]*\w", text):
            out.append((f"{path.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}", m.group(0)))
    return out


CONFIG_PATHS = _config_paths()


def test_config_paths_were_found():
    assert any(p == "configs/eval/pruning-tiny.yaml" for _, p in CONFIG_PATHS)


@pytest.mark.parametrize("loc,path", CONFIG_PATHS, ids=[f"{loc}:{p}" for loc, p in CONFIG_PATHS])
def test_named_config_exists_and_loads(loc, path):
    target = ROOT / path
    assert target.exists(), f"{loc}: {path} does not exist"
    if target.suffix == ".yaml":
        if target.parent.name == "eval":
            from vlmguard.bench.sweep import load_config

            assert load_config(target)["methods"]
        else:
            from vlmguard.workers.config import load_config as load_service_config

            assert load_service_config(target).models


def test_readme_main_commands_are_the_makefile_and_ci():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for target in ("demo", "test", "test-all"):
        assert f"make {target}" in readme
        assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"Makefile has no {target} target"
    assert re.search(r"^demo:.*\n\t\$\(BIN\)/vlmguard demo$", makefile, re.M)
    assert re.search(r"^test:.*\n\t\$\(BIN\)/python -m pytest -q$", makefile, re.M)
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^make test$", ci, re.M), ".ci/run does not run `make test`"
