"""vlmguard perf decode: every decoder runs through the benchmark (batch 1 and 2, with and without a pruner)
and the report has the right shape. No timed assertions."""
from __future__ import annotations


import pytest

from cli_support import run_json
from vlmguard.cli import main
from vlmguard.perf.decode import DECODE_TARGETS, decode_targets, per_token_time
from vlmguard.results import GenerationResult, Timings

DECODERS = ["greedy", "vcd", "m3id", "vista", "iava", "lqcd"]


@pytest.fixture(scope="module")
def report():
    return run_json(["perf", "decode", "--shape", "random:llava", "--decoders", ",".join(DECODERS),
                     "--batch", "1,2", "--new-tokens", "4", "--repeats", "1", "--warmup", "0", "--threads", "1",
                     "--quiet", "--json"])


def test_decode_report_rows(report):
    assert report["command"] == "perf decode" and report["pruning"] == "none"
    rows = {(r["decoder"], r["batch"]): r for r in report["rows"]}
    assert set(rows) == {(d, b) for d in DECODERS for b in (1, 2)}
    for (dec, b), r in rows.items():
        assert r["per_token_s"] > 0 and r["tokens_per_s"] == pytest.approx(b / r["per_token_s"])
        assert r["relative_to_greedy"] == pytest.approx(r["per_token_s"] / rows[("greedy", b)]["per_token_s"])
        assert 2 <= r["tokens_generated"] <= 4 * b
        assert r["prefill_s"] > 0 and r["ttft_s"] >= r["prefill_s"]
    assert rows[("greedy", 1)]["relative_to_greedy"] == pytest.approx(1.0)
    # decoders with a pre-pass report its time separately from the per-token figure
    assert rows[("vista", 1)]["setup_s"] > rows[("greedy", 1)]["setup_s"]
    targets = {t["decoder"]: t for t in report["targets"]}
    assert set(targets) == set(DECODE_TARGETS)
    for name, t in targets.items():
        assert t["threshold"] == DECODE_TARGETS[name]
        assert t["met"] == (t["value"] <= t["threshold"])


def test_decode_with_a_pruner_composed():
    data = run_json(["perf", "decode", "--shape", "random:llava", "--decoders", "vcd", "--batch", "1",
                     "--pruning", "fastv", "--budget", "8", "--new-tokens", "3", "--repeats", "1", "--warmup", "0",
                     "--threads", "1", "--quiet", "--json"])
    assert data["pruning"] == "fastv" and data["budget"] == 8
    assert [r["decoder"] for r in data["rows"]] == ["greedy", "vcd"]  # greedy is always the reference
    assert all(r["pruning"] == "fastv" for r in data["rows"])


def _result(ttft, total, steps):
    return GenerationResult(text="", token_ids=[], finish_reason="length", prompt_tokens=1, visual_tokens=0,
                            visual_tokens_kept=[], kept_indices=None,
                            timings=Timings(ttft_s=ttft, total_s=total, per_token_s=[0.0] * steps))


def test_per_token_time_spans_first_to_last_token():
    assert per_token_time([_result(1.0, 2.0, 5)]) == pytest.approx(0.25)
    # a batch: first token of any row to the last token of any row, over the longest row's steps
    assert per_token_time([_result(1.0, 1.5, 3), _result(1.0, 2.0, 5)]) == pytest.approx(0.25)
    assert per_token_time([_result(1.0, 1.0, 1)]) is None


def test_decode_targets_only_at_batch_one():
    rows = [{"decoder": "vcd", "batch": 1, "relative_to_greedy": 1.2},
            {"decoder": "vcd", "batch": 8, "relative_to_greedy": 2.0},
            {"decoder": "vista", "batch": 1, "relative_to_greedy": 1.2}]
    t = decode_targets(rows)
    assert [(x["decoder"], x["met"]) for x in t] == [("vcd", True), ("vista", False)]


def test_decode_rejects_pruning_without_budget(capsys):
    rc = main(["perf", "decode", "--shape", "random:llava", "--decoders", "vcd", "--pruning", "fastv", "--quiet"])
    assert rc == 2 and "needs --budget" in capsys.readouterr().err
