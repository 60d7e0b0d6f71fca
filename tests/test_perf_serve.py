"""vlmguard perf serve: the closed-loop load generator, the summary ratios, and the command end to end
(the direct-Engine path in the default suite; the Ray service paths in the slow suite)."""
from __future__ import annotations

import threading
import time

import pytest

from cli_support import run_json
from vlmguard.perf.serve import (closed_loop, one_client_interleaved, serve_summary, serve_targets,
                                 steady_throughput)


def test_closed_loop_runs_every_request_once_with_bounded_concurrency():
    seen: list[int] = []
    active, peak = [0], [0]
    lock = threading.Lock()

    def call(i):
        with lock:
            seen.append(i)
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.01)
        with lock:
            active[0] -= 1
        return 3, 0.004, 1 + i % 2  # (tokens, engine seconds, requests prefilled with it)

    r = closed_loop(call, 12, 4)
    assert sorted(seen) == list(range(12))
    assert peak[0] <= 4
    assert r["requests"] == 12 and r["errors"] == 0 and r["tokens"] == 36
    assert r["wall_requests_per_s"] == pytest.approx(12 / r["wall_s"])
    assert r["requests_per_s"] > 0 and r["tokens_per_s"] == pytest.approx(3 * r["requests_per_s"])
    assert r["latency_median_s"] >= 0.01
    assert r["added_latency_median_s"] == pytest.approx(r["latency_median_s"] - 0.004, abs=0.005)
    assert r["mean_prefill_batch"] == 1.5


def test_steady_throughput_leaves_out_the_ramp_and_the_drain():
    # A batching server with 4 clients: a lone first answer at t=1, then batches of 4 every 2 s, and the
    # last answers trickling out while the clients run dry. Steady state: 4 answers per 2 s.
    done = [(1.0, 5)] + [(1.0 + 2 * b, 5) for b in range(1, 6) for _ in range(4)] + [(12.0, 5), (13.0, 5)]
    n = len(done)
    rps, tps = steady_throughput(sorted(done), 4, 13.0)
    first, last = done[3][0], done[n - 4][0]  # the 4th answer and the 4th from last
    assert rps == pytest.approx((n - 4 - 3) / (last - first))
    assert tps == pytest.approx(5 * rps)
    assert rps > n / 13.0  # the whole-run figure understates a batching server's throughput
    # Too few answers for a window: answers over wall time.
    assert steady_throughput([(1.0, 2), (2.0, 2)], 4, 4.0) == (0.5, 1.0)


def test_one_client_paths_take_turns_request_by_request():
    order: list[tuple[str, int]] = []

    def path(name, sleep_s):
        def call(i):
            order.append((name, i))
            time.sleep(sleep_s)
            return 2, sleep_s / 2
        return call

    out = one_client_interleaved({"fast": path("fast", 0.002), "slow": path("slow", 0.02)}, 3)
    assert order == [("fast", 0), ("slow", 0), ("fast", 1), ("slow", 1), ("fast", 2), ("slow", 2)]
    assert out["fast"]["requests"] == out["slow"]["requests"] == 3
    assert out["slow"]["latency_median_s"] > 5 * out["fast"]["latency_median_s"]
    # each path's clock is its own time: throughput is 1 / its latency, not diluted by the other path
    assert out["slow"]["wall_requests_per_s"] == pytest.approx(1 / out["slow"]["latency_mean_s"])
    assert out["fast"]["tokens"] == 6


def test_closed_loop_counts_errors_and_goes_on():
    def call(i):
        if i % 3 == 0:
            raise RuntimeError("boom")
        return 1, 0.0

    r = closed_loop(call, 9, 2)
    assert r["requests"] == 6 and r["errors"] == 3 and "boom" in r["error_samples"][0]


def test_summary_and_targets():
    rows = [
        {"path": "engine", "clients": 1, "requests_per_s": 10.0, "latency_median_s": 0.100},
        {"path": "ray_unbatched", "clients": 1, "requests_per_s": 9.0, "latency_median_s": 0.110},
        {"path": "ray_batched", "clients": 1, "requests_per_s": 8.0, "latency_median_s": 0.120},
        {"path": "ray_unbatched", "clients": 16, "requests_per_s": 9.0, "latency_median_s": 1.7,
         "samples": {"requests_per_s": [9.0, 6.0]}},
        {"path": "ray_batched", "clients": 16, "requests_per_s": 36.0, "latency_median_s": 0.4,
         "samples": {"requests_per_s": [36.0, 30.0]}},
    ]
    s = serve_summary(rows)
    assert s["batching_speedup"] == {"1": pytest.approx(8 / 9), "16": pytest.approx(4.0)}
    assert s["batching_speedup_per_round"] == {"1": [], "16": [pytest.approx(4.0), pytest.approx(5.0)]}
    assert s["ray_latency_overhead_1_client"] == {"ray_unbatched": pytest.approx(1.1), "ray_batched": pytest.approx(1.2)}
    assert s["ray_latency_overhead_1_client_per_round"] == {"ray_unbatched": [], "ray_batched": []}
    met = {t["metric"]: t["met"] for t in serve_targets(rows)}
    assert met == {"batching_speedup_16_clients": True, "ray_unbatched_latency_over_engine_1_client": True,
                   "ray_batched_latency_over_engine_1_client": False}


@pytest.mark.parametrize("decoding", ["greedy", "vcd"])
def test_serve_engine_path_end_to_end(decoding):
    data = run_json(["perf", "serve", "--shape", "random:llava", "--clients", "1,3", "--requests", "3",
                     "--new-tokens", "3", "--repeats", "1", "--warmup", "0", "--no-ray", "--quiet", "--json",
                     "--decoding", decoding])
    assert data["command"] == "perf serve" and data["clients"] == [1, 3] and data["decoding"] == decoding
    assert [(r["path"], r["clients"]) for r in data["rows"]] == [("engine", 1), ("engine", 3)]
    for r in data["rows"]:
        assert r["requests"] == 3 and r["errors"] == 0
        assert r["requests_per_s"] > 0 and 3 <= r["tokens"] <= 9
        assert r["latency_p90_s"] >= r["latency_median_s"] > 0
    assert data["summary"]["batching_speedup"] == {}


def test_mixed_settings_give_each_request_its_own_length_and_sampling():
    from types import SimpleNamespace

    from vlmguard.perf.serve import max_request_tokens, request_spec

    args = SimpleNamespace(new_tokens=16, decoding="vcd", mixed_settings=True)
    specs = [request_spec(args, i) for i in range(6)]
    assert [s["max_new_tokens"] for s in specs] == [8, 16, 24, 8, 16, 24] and max_request_tokens(args) == 24
    assert [s.get("seed") for s in specs] == [None, 1, None, 3, None, 5]
    assert all(s["decoding"] == "vcd" and s.get("do_sample", False) == bool(i % 2) for i, s in enumerate(specs))
    data = run_json(["perf", "serve", "--shape", "random:llava", "--clients", "3", "--requests", "6",
                     "--new-tokens", "4", "--repeats", "1", "--warmup", "0", "--no-ray", "--quiet", "--json",
                     "--mixed-settings"])
    assert data["mixed_settings"] is True and data["rows"][0]["errors"] == 0
    assert data["rows"][0]["tokens"] <= 2 + 4 + 6 + 2 + 4 + 6


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("ingress,direct", [("model", None), ("separate", None), ("model", "--direct-ingress"),
                                            ("model", "--throughput-optimized")])
def test_serve_through_ray_batched_and_unbatched(tmp_path, ingress, direct):
    data = run_json(["perf", "serve", "--shape", "random:llava", "--clients", "1,4", "--requests", "8",
                     "--new-tokens", "4", "--repeats", "1", "--warmup", "1", "--quiet", "--json",
                     "--ingress", ingress, "--plot", str(tmp_path / "serve.png")]
                    # vcd: contrastive requests join; mixed settings: requests of other lengths and seeds too
                    + ([direct, "--decoding", "vcd", "--mixed-settings"] if direct else []))
    # Serve's throughput-optimized mode turns direct ingress on: the clients call the replicas' own servers
    assert data["ingress"] == ingress and data["direct_ingress"] is (direct is not None)
    assert data["throughput_optimized"] is (direct == "--throughput-optimized")
    assert data["decoding"] == ("vcd" if direct else "greedy")
    paths = {(r["path"], r["clients"]) for r in data["rows"]}
    assert paths == {(p, c) for p in ("engine", "ray_unbatched", "ray_batched") for c in (1, 4)}
    assert all(r["errors"] == 0 and r["requests"] == 8 for r in data["rows"])
    assert set(data["summary"]["batching_speedup"]) == {"1", "4"}
    assert set(data["summary"]["ray_latency_overhead_1_client"]) == {"ray_unbatched", "ray_batched"}
    assert (tmp_path / "serve.png").read_bytes()[:4] == b"\x89PNG"
