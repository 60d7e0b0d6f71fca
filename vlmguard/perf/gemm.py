"""``vlmguard perf gemm``: how fast this machine runs a shape's decoder-layer matrix products at each token count.

A prefill pruned to n tokens runs the same seven matrix products per decoder layer (q, k, v, o; gate, up, down)
as the unpruned prefill on N tokens, on fewer rows. If they ran at the same FLOP rate, the pruned LLM would
reach its FLOP ideal (``vlmguard perf prefill``'s ``llm_ideal_speedup``). They do not, for two reasons this
command separates:

- **streamed**: every layer's own weights, in the model's order, as a prefill reads them: a layer's weights
  come from memory (or a far cache) once per forward, whatever the number of tokens;
- **warm**: one layer's weights used by every layer, so they stay in the near caches: the rate of the kernel
  alone at that many rows.

``ceiling`` = the streamed rate at a count / the streamed rate at the reference count (the first of
``--tokens``, the unpruned prefill's): the share of its FLOP ideal the pruned LLM's matrix products can reach on
this machine. Attention, norms and the other per-token work are left out, so it bounds the LLM part of a pruned
prefill, not the whole. Weights are random (speed does not depend on their values), in the shape's dimensions.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import torch

from vlmguard.errors import InvalidInput
from vlmguard.flops import TextDims
from vlmguard.perf.timing import environment, median, sync

MAX_WEIGHT_BYTES = 8 << 30  # on a CPU: the streamed weights are allocated at once (a full-width 7B is 26 GB in fp32)


def layer_matrix_shapes(dims: TextDims) -> dict[str, tuple[int, int]]:
    """(out, in) of each weight of a decoder layer with a gated MLP (Llama, Qwen2: the LLMs of every shape)."""
    d, dq, dkv, m = dims.hidden, dims.q_width, dims.kv_width, dims.mlp
    return {"q": (dq, d), "k": (dkv, d), "v": (dkv, d), "o": (d, dq), "gate": (m, d), "up": (m, d), "down": (d, m)}


def layer_weight_count(dims: TextDims) -> int:
    """The weights of one decoder layer's seven matrices."""
    return sum(o * i for o, i in layer_matrix_shapes(dims).values())


def layer_gemm_flops(n: int, dims: TextDims) -> float:
    """Hardware FLOPs (two per multiply-accumulate) of one layer's seven matrix products on ``n`` tokens."""
    return 2.0 * n * layer_weight_count(dims)


def _text_config(shape: str) -> Any:
    from vlmguard.models.shapes import build_config, shape_spec

    shape_spec(shape)  # an unknown name is one InvalidInput listing the known shapes
    return build_config(shape).text_config


def weight_limit(device: torch.device | str) -> int:
    """The most bytes of streamed weights: :data:`MAX_WEIGHT_BYTES` on a CPU, 80% of a GPU's free memory."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(0.8 * torch.cuda.mem_get_info(device)[0])
    return MAX_WEIGHT_BYTES


def check_weight_bytes(dims: TextDims, layers: int, dtype: torch.dtype, limit: int = MAX_WEIGHT_BYTES) -> int:
    """The streamed weights' size, refused before anything is allocated when over ``limit``."""
    per_layer = layer_weight_count(dims) * torch.empty((), dtype=dtype).element_size()
    total = per_layer * layers
    if total > limit:
        raise InvalidInput(f"{layers} layers of this shape's weights take {total / 2**30:.1f} GiB (at most "
                           f"{limit / 2**30:.0f} GiB here): use --layers {max(1, limit // per_layer)} or fewer")
    return total


def run_gemm(shape: str, tokens: Sequence[int], *, layers: int | None = None, device: str = "cpu",
             dtype: torch.dtype = torch.float32, repeats: int = 7, warmup: int = 1, seed: int = 0,
             progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Time one pass of every layer's seven matrix products at each token count, streamed and warm (module doc),
    the counts and the two modes taking turns in every round. Returns the JSON report."""
    text = _text_config(shape)
    dims = TextDims.of(text)
    n_layers = int(layers or text.num_hidden_layers)
    weight_bytes = check_weight_bytes(dims, n_layers, dtype, weight_limit(device))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    shapes = layer_matrix_shapes(dims)

    def weights() -> dict[str, torch.Tensor]:
        return {k: (torch.randn(o, i, generator=gen) * i ** -0.5).to(device=device, dtype=dtype)
                for k, (o, i) in shapes.items()}

    streamed = [weights() for _ in range(n_layers)]
    modes = {"streamed": streamed, "warm": [streamed[0]] * n_layers}
    inputs = {n: {width: torch.randn(n, width, generator=gen).to(device=device, dtype=dtype)
                  for width in {dims.hidden, dims.q_width, dims.mlp}} for n in tokens}

    def one_pass(n: int, layer_weights: list[dict[str, torch.Tensor]]) -> float:
        x = inputs[n]
        sync(device)
        t0 = time.perf_counter()
        for w in layer_weights:
            for k in ("q", "k", "v", "gate", "up"):
                torch.nn.functional.linear(x[dims.hidden], w[k])
            torch.nn.functional.linear(x[dims.q_width], w["o"])
            torch.nn.functional.linear(x[dims.mlp], w["down"])
        sync(device)
        return time.perf_counter() - t0

    samples: dict[tuple[int, str], list[float]] = {(n, m): [] for n in tokens for m in modes}
    with torch.no_grad():
        for r in range(warmup + repeats):
            for n in tokens:
                for mode, layer_weights in modes.items():
                    t = one_pass(n, layer_weights)
                    if r >= warmup:
                        samples[(n, mode)].append(t / n_layers)
            if progress:
                progress(f"round {r + 1}/{warmup + repeats}" + (" (warm-up)" if r < warmup else ""))
    rows = []
    for n in tokens:
        flops = layer_gemm_flops(n, dims)
        per = {mode: median(samples[(n, mode)]) for mode in modes}
        rows.append({"tokens": n, "flops_per_layer": flops,
                     "streamed_s_per_layer": per["streamed"], "warm_s_per_layer": per["warm"],
                     "streamed_gflops": flops / per["streamed"] / 1e9, "warm_gflops": flops / per["warm"] / 1e9,
                     "samples": {mode: samples[(n, mode)] for mode in modes}})
    reference = rows[0]["streamed_gflops"]
    for row in rows:
        row["ceiling"] = row["streamed_gflops"] / reference
    env = environment()
    env.update(device=str(device), dtype=str(dtype).replace("torch.", ""))
    return {"command": "perf gemm", "shape": shape, "layers": n_layers, "reference_tokens": tokens[0],
            "weight_bytes": weight_bytes, "matrices": {k: list(v) for k, v in shapes.items()},
            "repeats": repeats, "warmup": warmup, "environment": env, "rows": rows}


GEMM_HEAD = ["tokens", "streamed us / layer", "warm us / layer", "streamed GFLOP/s", "warm GFLOP/s", "ceiling"]


def gemm_rows(result: dict[str, Any]) -> list[list[Any]]:
    """The report's table rows (GEMM_HEAD's columns), for the printed table and ``perf plot --markdown``."""
    return [[r["tokens"], r["streamed_s_per_layer"] * 1e6, r["warm_s_per_layer"] * 1e6, r["streamed_gflops"],
             r["warm_gflops"], r["ceiling"]] for r in result["rows"]]


def gemm_table(result: dict[str, Any]) -> str:
    from vlmguard.perf.report import table

    return (f"decoder-layer matrix products of {result['shape']} ({result['layers']} layers, "
            f"{result['weight_bytes'] / 2**20:.1f} MiB of weights, {result['environment']['dtype']}); ceiling = "
            f"streamed rate / the rate at {result['reference_tokens']} tokens\n" + table(GEMM_HEAD, gemm_rows(result)))
