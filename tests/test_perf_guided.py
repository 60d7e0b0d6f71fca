"""vlmguard perf guided: the synthetic vocabulary has the size asked for and follows every format, the report's rows
are consistent with themselves and with the decode steps measured beside them, the files it writes are drawn and
tabled by ``perf plot``, and bad input is one line. No timed assertions."""
from __future__ import annotations


import pytest

from cli_support import check_one_line_error, check_plot_and_table, run_json
from vlmguard.guided import new_matcher
from vlmguard.perf.guided import FORMATS, synthetic_vocabulary
from vlmguard.spec import GuidedOutput


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("guided") / "guided.json"
    result = run_json(["perf", "guided", "--vocab", "1200", "--batch", "1,3", "--steps", "12", "--repeats", "2",
                       "--warmup", "0", "--shape", "tiny", "--threads", "1", "--quiet", "--json", "--out", str(out)])
    return result, out


def test_the_vocabulary_has_its_size_and_every_format_compiles_for_it():
    tok = synthetic_vocabulary(1500, seed=1)
    assert len(tok) == 1500 and tok.decode(tok('{"count": 12}')["input_ids"]) == '{"count": 12}'
    for fields in FORMATS.values():
        matcher = new_matcher(tok, len(tok), [tok.eos_token_id], GuidedOutput(**fields))
        assert not matcher.is_error()


def test_rows_cover_every_format_and_batch_and_divide_up(report):
    result, _ = report
    assert result["command"] == "perf guided" and result["vocab"] == 1200 and result["shape"] == "tiny"
    assert [(r["format"], r["batch"]) for r in result["rows"]] == [(f, b) for f in FORMATS for b in (1, 3)]
    for r in result["rows"]:
        assert r["compile_s"] > 0 and r["step_s"] > 0
        assert r["per_request_token_s"] == pytest.approx(r["step_s"] / r["batch"])
        assert r["decode_step_s"] > 0 and r["relative_to_decode_step"] == pytest.approx(r["step_s"]
                                                                                         / r["decode_step_s"])
    steps = {r["batch"]: r["decode_step_s"] for r in result["rows"]}
    assert all(r["decode_step_s"] == steps[r["batch"]] for r in result["rows"])  # one measurement per batch size


def test_the_written_report_is_plotted_and_tabled(report, tmp_path, capsys):
    result, out = report
    check_plot_and_table(result, out, tmp_path, capsys, "| format | batch | compile ms |", 2 * len(FORMATS))


@pytest.mark.parametrize("argv, message", [
    (["--formats", "json_schema,xml"], "--formats: unknown format(s) xml"),
    (["--vocab", "100"], "--vocab must be at least 300"),
    (["--shape", "no-such-shape"], "unknown shape 'no-such-shape'"),
])
def test_bad_input_is_one_line_before_any_work(argv, message, capsys):
    check_one_line_error(["perf", "guided", "--quiet", *argv], message, capsys)
