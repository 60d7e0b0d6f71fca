"""vlmguard perf prefix: batches of questions about the same images, prefilled with shared prefixes and without,
in one run; the report's rows, its token counts and its figure. No timed assertions."""
from __future__ import annotations

import json

import pytest

from cli_support import run_json
from vlmguard.cli import main
from vlmguard.perf.report import markdown


@pytest.fixture(scope="module")
def report():
    return run_json(["perf", "prefix", "--shape", "tiny", "--decoders", "greedy,lqcd,vcd", "--batch", "6",
                     "--questions-per-image", "3", "--repeats", "1", "--warmup", "0", "--threads", "1", "--quiet",
                     "--cache", "--json"])


def test_prefix_report_rows(report):
    assert report["command"] == "perf prefix" and report["batch"] == 6 and report["questions_per_image"] == 3
    rows = {r["decoder"]: r for r in report["rows"]}
    assert set(rows) == {"greedy", "lqcd", "vcd"}
    for name, r in rows.items():
        assert r["same_tokens"], name  # sharing changes no answer
        assert r["unshared_prefill_s"] > 0 and r["shared_prefill_s"] > 0
        assert r["speedup"] == pytest.approx(r["unshared_prefill_s"] / r["shared_prefill_s"])
        assert 0 < r["shared_tokens"] < r["prefill_tokens"], name
        assert r["ideal_speedup"] == pytest.approx(r["prefill_tokens"] / (r["prefill_tokens"] - r["shared_tokens"]))
    # greedy: 6 rows of the same length, two images of three questions: each group's two followers share their
    # leader's prefix; LQCD has three rows per request (its query variants), VCD two (the noised image)
    assert rows["lqcd"]["prefill_tokens"] > 2 * rows["greedy"]["prefill_tokens"]
    assert rows["vcd"]["prefill_tokens"] == 2 * rows["greedy"]["prefill_tokens"]
    assert rows["lqcd"]["shared_tokens"] > rows["greedy"]["shared_tokens"]
    assert rows["greedy"]["unshared_setup_s"] >= 0 and rows["greedy"]["shared_setup_s"] >= 0
    # --cache: the same batch after an earlier one about the same images. Every main row takes its image prefix
    # from the cache (LQCD's query variants too; VCD's noised rows take their own: the noise is seeded by the
    # image), the answers are the same
    assert report["cache"] is True
    for name, r in rows.items():
        assert r["cached_same_tokens"], name
        assert r["cached_speedup"] == pytest.approx(r["unshared_prefill_s"] / r["cached_prefill_s"])
        assert r["cached_tokens"] > 0 and r["cached_ideal_speedup"] > r["ideal_speedup"], name
        assert r["cached_ideal_speedup"] == pytest.approx(
            r["prefill_tokens"] / (r["prefill_tokens"] - r["cached_tokens"] - r["cached_shared_tokens"]))
    assert rows["lqcd"]["cached_tokens"] == 3 * rows["greedy"]["cached_tokens"]
    assert rows["vcd"]["cached_tokens"] == 2 * rows["greedy"]["cached_tokens"]
    # the two images' tower output, once per image (a row about the same image as an earlier row of the batch takes
    # that row's); VCD's noised copies are two other images, kept as well
    assert {n: (r["cached_image_hits"], r["cached_pruned_hits"]) for n, r in rows.items()} == {
        "greedy": (2, 0), "lqcd": (2, 0), "vcd": (4, 0)}


def test_prefix_report_figure_and_markdown(report, tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(report))
    assert main(["perf", "plot", str(path), "--out", str(tmp_path / "r.png"), "--markdown"]) == 0
    assert (tmp_path / "r.png").stat().st_size > 0
    assert markdown(report).splitlines()[0].startswith("| decoder | unshared prefill s | shared prefill s")


def test_prefix_with_a_vision_side_pruner_from_a_warm_cache():
    """``--pruning flowcut``: the warm cache holds FlowCut's cut of each image, so the cached batch runs neither the
    tower nor stage V (its vision time is the lookup's) and answers as the fresh one does."""
    report = run_json(["perf", "prefix", "--shape", "tiny", "--decoders", "greedy", "--batch", "2",
                       "--questions-per-image", "1", "--repeats", "1", "--warmup", "0", "--threads", "1", "--quiet",
                       "--pruning", "flowcut", "--budget", "16", "--cache", "--json"])
    assert (report["pruning"], report["budget"]) == ("flowcut", 16)
    (row,) = report["rows"]
    assert row["same_tokens"] and row["cached_same_tokens"] and row["cached_tokens"] > 0
    assert (row["cached_pruned_hits"], row["cached_image_hits"]) == (2, 0)  # both images, as FlowCut cut them
    assert row["cached_vision_s"] >= 0 and row["unshared_vision_s"] > 0


def test_prefix_refuses_an_unknown_decoder_before_loading(capsys):
    assert main(["perf", "prefix", "--shape", "random:llava", "--decoders", "greedy,nope", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "Traceback" not in err
