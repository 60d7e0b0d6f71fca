"""vlmguard perf routing: its report (rows, table, markdown, plot), the benchmark shapes a service can load, and the
command end to end over Ray (slow suite)."""
from __future__ import annotations

import os

import pytest

from cli_support import run_json
from vlmguard.perf.routing import _row, routing_table


def _sample(turn: int, latency: float, cached: int, prompt: int = 100) -> dict:
    return {"turn": turn, "latency_s": latency, "cached_tokens": cached, "prompt_tokens": prompt}


def test_a_turns_row_counts_the_requests_that_took_tokens_from_a_cache():
    row = _row("image_affinity", 2, [_sample(2, 0.3, 90), _sample(2, 0.1, 0), _sample(2, 0.2, 60),
                                     _sample(2, 0.5, 0, prompt=120)])
    assert row["requests"] == 4 and row["cached_share"] == 0.5
    assert row["mean_cached_tokens"] == 37.5 and row["mean_prompt_tokens"] == 105
    assert row["latency_median_s"] == pytest.approx(0.25) and row["latency_p90_s"] == 0.5
    assert row["errors"] == 0 and row["first_error"] is None
    # a failed turn is counted, not averaged; a turn with nothing but failures still makes a row
    row = _row("power_of_two", 3, [_sample(3, 0.4, 0), {"turn": 3, "error": "HTTP 503: overloaded"}])
    assert row["requests"] == 2 and row["errors"] == 1 and row["first_error"] == "HTTP 503: overloaded"
    assert row["cached_share"] == 0 and row["latency_median_s"] == row["latency_p90_s"] == 0.4
    row = _row("power_of_two", 3, [{"turn": 3, "error": "ConnectError: refused"}])
    assert row["errors"] == 1 and row["cached_share"] is None and row["latency_median_s"] is None


def test_a_failed_turn_ends_its_conversation_and_is_reported(monkeypatch):
    import httpx

    from vlmguard.perf.routing import conversation_caller

    replies = iter([httpx.Response(200, json={"usage": {"prompt_tokens": 50, "prompt_tokens_details":
                                                        {"cached_tokens": 0}},
                                              "choices": [{"message": {"content": "a cat"}}]}),
                    httpx.Response(503, text="overloaded")])
    monkeypatch.setattr(httpx.Client, "post", lambda self, url, json: next(replies))
    turns = conversation_caller("http://x", "tiny", turns=3, new_tokens=2)("data:image/png;base64,")
    assert [t["turn"] for t in turns] == [1, 2] and turns[0]["prompt_tokens"] == 50
    assert turns[1] == {"turn": 2, "error": "HTTP 503: overloaded"}


def test_the_report_prints_as_a_table_markdown_and_a_plot(tmp_path):
    from vlmguard.perf.plots import plot_report
    from vlmguard.perf.report import markdown

    rows = [_row(r, t, [_sample(t, 0.2 * t, 0 if t == 1 or r == "power_of_two" else 80)])
            for r in ("power_of_two", "image_affinity") for t in (1, 2)]
    result = {"command": "perf routing", "shape": "tiny", "replicas": 2, "clients": 4, "conversations": 8,
              "turns": 2, "new_tokens": 8, "repeats": 1, "think_s": 0.5, "spill_queue": 8, "rows": rows,
              "summary": {"later_turns_cached_share": {"power_of_two": 0.0, "image_affinity": 1.0},
                          "later_turns_latency_power_of_two_over_image_affinity": 1.25}}
    text = routing_table(result)
    assert "image_affinity 1" in text and "power_of_two / image_affinity: 1.25x" in text and "think_s=0.5" in text
    assert "first error" not in text
    md = markdown(result).splitlines()
    assert md[0].startswith("| routing | turn |") and len(md) == 2 + 4
    plot_report(result, tmp_path / "routing.png")
    assert (tmp_path / "routing.png").read_bytes()[:4] == b"\x89PNG"


def test_a_benchmark_shape_is_saved_for_the_service_to_load_and_removed_after():
    from vlmguard.engine import Engine
    from vlmguard.perf.models import servable_model

    with servable_model("random:llava") as name:
        assert name == "random:llava"  # what Engine.load knows already is loaded as it is
    with servable_model("llava-1.5-7b-cpu") as path:
        assert os.path.isfile(os.path.join(path, "config.json"))
        engine = Engine.load(path)
        assert engine.family == "llava" and engine.model.config.text_config.hidden_size == 256
        assert engine.model.config.text_config.num_hidden_layers == 32
    assert not os.path.exists(path)


@pytest.mark.slow
@pytest.mark.ray
def test_perf_routing_end_to_end(tmp_path):
    data = run_json(["perf", "routing", "--shape", "random:llava", "--conversations", "3", "--turns", "2",
                     "--clients", "2", "--new-tokens", "3", "--repeats", "1", "--warmup", "0", "--quiet", "--json",
                     "--plot", str(tmp_path / "routing.png")])
    assert data["command"] == "perf routing" and data["replicas"] == 2
    assert [(r["routing"], r["turn"], r["requests"]) for r in data["rows"]] == [
        ("power_of_two", 1, 3), ("power_of_two", 2, 3), ("image_affinity", 1, 3), ("image_affinity", 2, 3)]
    assert all(r["errors"] == 0 for r in data["rows"])
    assert all(r["cached_share"] == 0 for r in data["rows"] if r["turn"] == 1)
    assert data["summary"]["later_turns_cached_share"]["image_affinity"] == 1.0  # each next turn finds its image
    assert (tmp_path / "routing.png").read_bytes()[:4] == b"\x89PNG"
