"""``vlmguard bench export`` (``vlmguard/bench/export.py``): a benchmark's requests as an OpenAI batch file that,
answered by ``vlmguard run-batch`` and scored by ``vlmguard score``, gives the metrics ``vlmguard bench`` gives on
the same samples; and its refusals."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_support import check_one_line_error, run_json

ROOT = Path(__file__).resolve().parents[1]
SYNTH = ROOT / "tests" / "fixtures" / "bench" / "synth_mini"


def _exported_then_scored(tmp_path: Path, benchmark: str, *extra: str) -> tuple[dict, list[dict], dict]:
    requests, answers = tmp_path / f"{benchmark}.jsonl", tmp_path / f"{benchmark}-out.jsonl"
    summary = run_json(["bench", "export", benchmark, "--dataset", str(SYNTH), "-o", str(requests), "--model", "tiny",
                        *extra, "--json"])
    run_json(["run-batch", "-i", str(requests), "-o", str(answers), "--json"])
    score = summary["score"].replace("OUTPUT", str(answers)).split()[1:]  # the command the export printed
    return summary, [json.loads(line) for line in requests.read_text().splitlines()], run_json([*score, "--json"])


def test_pope_exported_answered_and_scored_equals_the_benchmark(tmp_path):
    summary, lines, scored = _exported_then_scored(tmp_path, "pope", "--split", "adversarial")
    bench = run_json(["bench", "pope", "--model", "tiny", "--dataset", str(SYNTH), "--split", "adversarial",
                      "--db", str(tmp_path / "r.sqlite"), "--no-progress", "--json"])["metrics"]["adversarial"]
    assert summary["requests"] == len(lines) == bench["n"] == scored["n"] == 24
    assert {k: scored[k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")} == \
        {k: bench[k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")}
    body = lines[0]["body"]
    assert lines[0]["url"] == "/v1/chat/completions" and body["temperature"] == 0 and body["max_tokens"] == 128
    assert body["vlmguard"] == {"image_aspect": "reference"} and body["model"] == "tiny"
    assert body["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert body["messages"][0]["content"][1]["text"].endswith("\nAnswer the question using a single word or phrase.")


def test_chair_exported_answered_and_scored_equals_the_benchmark(tmp_path):
    summary, lines, scored = _exported_then_scored(tmp_path, "chair", "--preset", "chair64", "--limit", "4",
                                                   "--url", "/v1/responses")
    bench = run_json(["bench", "chair", "--model", "tiny", "--dataset", str(SYNTH), "--preset", "chair64",
                      "--limit", "4", "--db", str(tmp_path / "r.sqlite"), "--no-progress", "--json"])
    metrics = bench["metrics"]["chair64"]
    assert "--drop-incomplete" in summary["score"] and len(lines) == scored["n"] == 4
    assert {k: scored[k] for k in ("chair_s", "chair_i", "recall", "len")} == \
        {k: metrics[k] for k in ("chair_s", "chair_i", "recall", "len")}
    assert lines[0]["body"]["max_output_tokens"] == 64 and lines[0]["body"]["input"][0]["content"][0]["type"] == \
        "input_image"


def test_file_urls_plain_requests_and_refusals(tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    run_json(["bench", "export", "pope", "--dataset", str(SYNTH), "-o", str(out), "--images", "file", "--plain",
              "--limit", "2", "--json"])
    body = json.loads(out.read_text().splitlines()[0])["body"]
    assert "vlmguard" not in body and "model" not in body
    assert body["messages"][0]["content"][0]["image_url"]["url"].startswith(f"file://{SYNTH}")
    base = ["bench", "export", "pope", "--dataset", str(SYNTH), "-o", str(out)]
    check_one_line_error([*base, "--prompt-preset", "opera"], "writes LLaVA-1.5's whole prompt itself", capsys)
    check_one_line_error([*base, "--plain", "--pruning", "fastv"], "--plain writes no vlmguard object: --pruning",
                         capsys)


@pytest.mark.parametrize("argv, needle", [(["--dataset", "/nope"], "expected 'synthcoco', 'coco'"),
                                          (["-o", "/proc/x/y.jsonl"], "--out")])
def test_bad_exports_are_one_line_errors(tmp_path, capsys, argv, needle):
    args = ["bench", "export", "pope", "--dataset", str(SYNTH), "-o", str(tmp_path / "p.jsonl")]
    for flag, value in zip(argv[::2], argv[1::2]):
        args[args.index(flag) + 1] = value
    check_one_line_error(args, needle, capsys)
