"""vlmguard perf prefill: the command runs end to end on a tiny model and reports sane, consistent figures.

No timed assertions: speed is a benchmark output, not a test. The checks are on structure and on the
quantities that do not depend on the machine (tokens per layer, FLOPs, KV-cache bytes, ratios' definitions).
"""
from __future__ import annotations

import json

import pytest

from cli_support import run_json
from vlmguard.cli import main


def run_cli(capsys, argv):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("perf")
    data = run_json(["perf", "prefill", "--shape", "random:llava", "--methods", "none,random,fastv,adaptinfer,flowcut",
                     "--budgets", "8,4", "--repeats", "2", "--warmup", "1", "--threads", "1", "--quiet", "--json",
                     "--out", str(out_dir / "prefill.json"), "--plot", str(out_dir / "prefill.png")])
    return data, out_dir


def test_prefill_report_shape(report):
    data, out_dir = report
    assert data["command"] == "perf prefill"
    assert data["shape"] == "random:llava" and data["batch"] == 1 and data["repeats"] == 2
    assert data["environment"]["device"] == "cpu" and data["environment"]["threads"] == 1
    labels = [(r["method"], r["budget"]) for r in data["rows"]]
    assert labels[0] == ("none", None)
    assert set(labels[1:]) == {(m, b) for m in ("random", "fastv", "adaptinfer", "flowcut") for b in (8, 4)}
    for row in data["rows"]:
        for key in ("speedup", "ideal_speedup", "achieved_over_ideal", "times", "memory", "flops"):
            assert key in row
        t = row["times"]
        assert len(t["samples"]["prefill_s"]) == 2
        assert 0 < t["vision_s"] < t["prefill_s"] <= t["ttft_s"] + 1e-9
        assert row["memory"]["kv_cache_bytes"] > 0 and row["memory"]["peak_bytes"] >= 0
        assert row["speedup"] > 0
        assert row["achieved_over_ideal"] == pytest.approx(row["speedup"] / row["ideal_speedup"])
        assert row["llm_speedup"] > 0 and row["llm_ideal_speedup"] >= 1.0
        assert row["cpu_speedup"] > 0 and 0 < t["generate_cpu_s"]
        assert len(t["samples"]["generate_cpu_s"]) == 2
        assert row["memory"]["peak_source"] in ("malloc_in_use_sampled", "rss_sampled")
    # the unpruned prefill allocates activations and the KV cache: a positive peak above the entry level
    base = data["rows"][0]
    assert base["memory"]["peak_bytes"] > 0
    # the JSON file written with --out is the same report; the plot is a PNG
    assert json.loads((out_dir / "prefill.json").read_text())["rows"] == data["rows"]
    assert (out_dir / "prefill.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prefill_counts_tokens_each_layer_saw(report):
    data, _ = report
    rows = {(r["method"], r["budget"]): r for r in data["rows"]}
    base = rows[("none", None)]
    assert base["speedup"] == pytest.approx(1.0) and base["ideal_speedup"] == pytest.approx(1.0)
    n_layers = len(base["visual_tokens_per_layer"])
    assert base["visual_tokens_per_layer"] == [16] * n_layers  # tiny LLaVA: 4x4 patches
    for (method, budget), row in rows.items():
        if method == "none":
            continue
        vis = row["visual_tokens_per_layer"]
        assert len(vis) == n_layers and max(vis) <= 16
        assert row["mean_visual_tokens_per_layer"] < 16
        # fewer tokens -> fewer FLOPs and a smaller KV cache, so an ideal speed-up above 1
        assert row["flops"]["llm"] < base["flops"]["llm"]
        assert row["ideal_speedup"] > 1.0 and row["llm_ideal_speedup"] > 1.0
        assert row["memory"]["kv_cache_bytes"] < base["memory"]["kv_cache_bytes"]
    # random and flowcut prune before the LLM: every layer sees exactly the budget
    for budget in (8, 4):
        assert rows[("random", budget)]["visual_tokens_per_layer"] == [budget] * n_layers
        assert rows[("flowcut", budget)]["visual_tokens_per_layer"] == [budget] * n_layers
        # FlowCut prunes inside the ViT too: its vision FLOPs drop, the schedule is reported
        assert rows[("flowcut", budget)]["flops"]["vision"] < base["flops"]["vision"]
        assert rows[("flowcut", budget)]["vit_tokens_per_layer"][0] == 17  # CLS + 16 patches at layer 0
    # fastv keeps all tokens in the layers before its cut
    assert rows[("fastv", 4)]["visual_tokens_per_layer"][0] == 16


def test_prefill_table_output(capsys):
    rc, out = run_cli(capsys, ["perf", "prefill", "--shape", "random:llava", "--methods", "none,random",
                               "--budgets", "4", "--repeats", "1", "--warmup", "0", "--threads", "1", "--quiet"])
    assert rc == 0
    lines = out.out.strip().splitlines()
    assert lines[0].startswith("perf prefill  shape=random:llava")
    assert "speedup" in lines[1] and "ideal" in lines[1]
    assert any(line.split()[0] == "random" for line in lines[3:])


def test_prefill_methods_with_parameters_on_qwen2_vl():
    """``NAME[KEY=VALUE;...]`` runs a method with its parameters as its own row: FlowCut on Qwen2-VL with and
    without its ViT stage, the merger counted on what it ran on."""
    data = run_json(["perf", "prefill", "--shape", "random:qwen2_vl", "--methods",
                     "flowcut,flowcut[qwen_vit_keep=0;history=0.5]", "--budgets", "2", "--repeats", "1",
                     "--warmup", "0", "--threads", "1", "--quiet", "--json"])
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"none", "flowcut", "flowcut[qwen_vit_keep=0;history=0.5]"}
    with_v, without = rows["flowcut"], rows["flowcut[qwen_vit_keep=0;history=0.5]"]
    assert without["params"] == {"qwen_vit_keep": 0, "history": 0.5} and with_v["params"] == {}
    n = rows["none"]["visual_tokens"]
    assert without["visual_tokens_per_layer"][:3] == [n, n, 2] and without["vit_tokens_per_layer"] is None
    assert with_v["visual_tokens_per_layer"][:3] == [4, 4, 2] and with_v["vit_tokens_per_layer"]
    assert without["flops"]["projector"] == rows["none"]["flops"]["projector"]
    assert with_v["flops"]["projector"] == pytest.approx(rows["none"]["flops"]["projector"] * 4 / n)
    assert [t["method"] for t in data["targets"]] == []  # targets are read at budget 64 only


@pytest.mark.parametrize("argv, needle", [
    (["--methods", "none,nosuchmethod"], "nosuchmethod"),
    (["--methods", "flowcut[qwen_vit_keep=-1]"], "qwen_vit_keep"),
    (["--methods", "flowcut[qwen_vit_keep=0"], "expected NAME or NAME[KEY=VALUE;...]"),
    (["--methods", "random[bogus=1]"], "bogus"),
    (["--methods", "flowcut[qwen_vit_keep]"], "method 'flowcut' expects key=value"),
    (["--methods", "flowcut[qwen_vit_keep=0.5]"], "must be 0 (no ViT stage) or >= 1"),
    (["--budgets", "999"], "budget"),
    (["--shape", "no-such-shape"], "unknown shape"),
])
def test_prefill_user_errors(capsys, argv, needle):
    base = ["perf", "prefill", "--shape", "random:llava", "--methods", "none,random", "--budgets", "4",
            "--repeats", "1", "--warmup", "0", "--quiet"]
    rc, out = run_cli(capsys, base + argv)
    assert rc == 2
    assert out.err.startswith("vlmguard: error:") and needle in out.err
    assert "Traceback" not in out.err


def test_plot_command_redraws_and_prints_markdown(report, capsys, tmp_path):
    _, out_dir = report
    rc, out = run_cli(capsys, ["perf", "plot", str(out_dir / "prefill.json"), "--out", str(tmp_path / "again.png"),
                               "--markdown"])
    assert rc == 0
    lines = out.out.strip().splitlines()
    assert lines[0].startswith("| method | budget |") and lines[1].startswith("|---|")
    assert len([line for line in lines if line.startswith("| ")]) == 1 + 9  # header + none + 4 methods x 2 budgets
    assert (tmp_path / "again.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "bad.json").write_text('{"hello": 1}')
    rc, out = run_cli(capsys, ["perf", "plot", str(tmp_path / "bad.json"), "--out", str(tmp_path / "x.png")])
    assert rc == 2 and "not a vlmguard perf report" in out.err
