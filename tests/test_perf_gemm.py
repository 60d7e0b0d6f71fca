"""vlmguard perf gemm: the report's rows are consistent with the FLOP model and with themselves, the files it writes
are drawn and tabled by ``perf plot``, and bad input is one line. No timed assertions."""
from __future__ import annotations

import argparse

import pytest

from cli_support import check_one_line_error, check_plot_and_table, run_json
from vlmguard.cli import main
from vlmguard.flops import HARDWARE, TextDims, llm_layer_flops
from vlmguard.models.shapes import build_config
from vlmguard.perf.gemm import layer_gemm_flops

SHAPE = "llava-1.5-7b-cpu"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gemm") / "gemm.json"
    result = run_json(["perf", "gemm", "--shape", SHAPE, "--tokens", "40,24,8", "--layers", "3", "--repeats", "2",
                       "--warmup", "0", "--threads", "1", "--quiet", "--json", "--out", str(out)])
    return result, out


def test_rows_follow_the_flop_model_and_the_reference(report):
    result, _ = report
    dims = TextDims.of(build_config(SHAPE).text_config)
    assert result["command"] == "perf gemm" and result["layers"] == 3 and result["reference_tokens"] == 40
    assert [r["tokens"] for r in result["rows"]] == [40, 24, 8]
    assert result["weight_bytes"] == 3 * 4 * sum(o * i for o, i in result["matrices"].values())
    for r in result["rows"]:
        n = r["tokens"]
        # the FLOP model's layer without its attention products (2 * causal pairs * q width, in hardware FLOPs)
        assert r["flops_per_layer"] == pytest.approx(
            llm_layer_flops(n, dims, HARDWARE) - 2 * 2 * n * (n + 1) / 2 * dims.q_width)
        assert r["flops_per_layer"] == layer_gemm_flops(n, dims)
        for mode in ("streamed", "warm"):
            assert len(r["samples"][mode]) == 2
            assert r[f"{mode}_gflops"] == pytest.approx(r["flops_per_layer"] / r[f"{mode}_s_per_layer"] / 1e9)
        assert r["ceiling"] == pytest.approx(r["streamed_gflops"] / result["rows"][0]["streamed_gflops"])
    assert result["rows"][0]["ceiling"] == 1.0


def test_the_written_report_is_plotted_and_tabled(report, tmp_path, capsys):
    result, out = report
    check_plot_and_table(result, out, tmp_path, capsys, "| tokens | streamed us / layer |", 3)


@pytest.mark.parametrize("argv, message", [
    (["--shape", "llava-1.5-7b"],
     "32 layers of this shape's weights take 24.1 GiB (at most 8 GiB here): use --layers 10 or fewer"),
    (["--shape", "no-such-shape"], "unknown model shape 'no-such-shape'"),
    (["--dtype", "int3"], "unknown dtype 'int3'"),
])
def test_bad_input_is_one_line_before_any_weight_is_built(argv, message, capsys):
    check_one_line_error(["perf", "gemm", "--quiet", *argv], message, capsys)


def test_a_token_count_of_zero_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["perf", "gemm", "--tokens", "87,0"])
    assert e.value.code == 2 and "--tokens" in capsys.readouterr().err


def test_the_default_token_counts_are_what_perf_prefill_feeds_the_default_shape():
    from vlmguard.models.base import Prompt
    from vlmguard.perf.cli import DEFAULT_SHAPE, register
    from vlmguard.perf.models import PROMPT, bench_image, load_engine

    eng = load_engine(DEFAULT_SHAPE, device="cpu", dtype="float32")
    ids = eng.adapter.encode([Prompt(text=PROMPT, images=[bench_image(eng, 0)])]).input_ids[0]
    text = int((ids != eng.adapter.image_token_id).sum())
    visual = len(ids) - text
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    defaults = parser.parse_args(["perf", "gemm"]).tokens
    assert defaults == [visual + text] + [b + text for b in (192, 128, 64)]
