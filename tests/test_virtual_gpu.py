"""What a GPU run would refuse or wait for, checked on the CPU with an emulated CUDA device
(tests/device_emulation.py: every tensor carries its placement, the model sits on a virtual ``cuda:0``).

- every pruner x every decoder, on each family, with requests joining a running batch, sampling, penalties,
  log-probabilities and stop strings, never meets a host tensor with a GPU tensor (CUDA's "Expected all tensors
  to be on the same device"), and gives the tokens the same run gives on the CPU;
- the bundled model in bfloat16 too;
- a decode step makes a fixed number of host syncs whatever the batch: the sampled rows' distributions reach
  the host in one copy, the step's tokens, NaN flags and diagnostics in one read, the log-probabilities in one.
"""
from __future__ import annotations

import pytest
import torch

from device_emulation import VirtualCuda, fake_cuda_runtime, put_on_gpu
from pruning_support import DECODER_PARAMS as DECODERS, run_joined
from vlmguard.engine import Engine, Request
from vlmguard.spec import GenerationSpec
from vlmguard.testing import FAMILIES, random_image

pytestmark = pytest.mark.usefixtures("one_thread")
PRUNERS = {"none": {}, "random": {}, "fastv": {}, "adaptinfer": {"position_mode": "renumber"},
           "flowcut": {"position_mode": "original"}}
BUDGET = {"llava": 8, "llava_next": 8, "qwen2_vl": 3}


@pytest.fixture
def cuda_runtime(monkeypatch):
    return fake_cuda_runtime(monkeypatch)


def gpu_engine(model, processor, name: str = "tiny") -> Engine:
    put_on_gpu(model)
    with VirtualCuda():
        engine = Engine(model, processor, name=name)
        assert engine.device == torch.device("cuda", 0)  # (the placement only shows inside the emulation)
    return engine


def rich_spec(family: str, pruner: str, decoder: str) -> GenerationSpec:
    # AdaptInfer's renumbering is for 1-D RoPE only: Qwen2-VL keeps its positions
    params = {} if (family, pruner) == ("qwen2_vl", "adaptinfer") else PRUNERS[pruner]
    return GenerationSpec(pruning=pruner, budget=None if pruner == "none" else BUDGET[family],
                          pruning_params=params, decoding=decoder, decoding_params=DECODERS[decoder],
                          max_new_tokens=5, min_new_tokens=2, do_sample=True, temperature=0.8, top_p=0.9, top_k=20,
                          seed=3, presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2, logprobs=3,
                          stop=["zz"])


def test_the_emulation_finds_a_mixed_op_and_a_sync():
    lin = torch.nn.Linear(4, 4)
    put_on_gpu(lin)
    vc = VirtualCuda()
    with vc:
        x = torch.ones(2, 4)
        assert x.device == torch.device("cpu") and lin.weight.device == torch.device("cuda", 0)
        lin(x)  # a host input into GPU weights
        y = lin(x.to(lin.weight.device))
        assert y.device == torch.device("cuda", 0)
        y + torch.tensor(1.0)  # a 0-dim host tensor is a scalar: allowed
        y[torch.tensor([0])]  # host indices into a GPU tensor: allowed
        y.sum().item()
    assert len(vc.mismatches) == 1 and "linear" in next(iter(vc.mismatches))
    assert sum(vc.syncs.values()) == 1


@pytest.mark.parametrize("family", list(BUDGET))
def test_every_method_keeps_its_tensors_on_the_gpu(family, cuda_runtime):
    model, processor = FAMILIES[family](seed=0)
    cpu_engine = Engine(*FAMILIES[family](seed=0), name="tiny")
    engine = gpu_engine(model, processor)
    first = [Request("Is there a dog in the image?", [random_image(1, (40, 32))]), Request("what color is the car", [])]
    later = [Request("describe the photo", [random_image(2, (64, 64)), random_image(3, (48, 40))])]
    for pruner in PRUNERS:
        for decoder in DECODERS:
            what = f"{family} {pruner} x {decoder}"
            spec = rich_spec(family, pruner, decoder)
            vc = VirtualCuda()
            with vc:
                on_gpu = run_joined(engine, spec, first, later, join_after=2)
            assert not vc.mismatches, f"{what}: {dict(vc.mismatches)}"
            on_cpu = run_joined(cpu_engine, spec, first, later, join_after=2)
            assert [r.token_ids for r in on_gpu] == [r.token_ids for r in on_cpu], what
            assert all(r.error is None for r in on_gpu), what
    # the engine took its CUDA branches: it waited for the engine's GPU around its timed phases
    assert cuda_runtime and set(cuda_runtime) == {torch.device("cuda", 0)}


def test_the_bundled_model_in_bfloat16(cuda_runtime):
    base = Engine.load("tiny", device="cpu", dtype="bfloat16")
    engine = gpu_engine(base.model, base.processor)
    requests = [Request("Is there a dog in the image?", [random_image(1, (96, 96))]),
                Request("Please describe this image in detail.", [random_image(2, (96, 96))])]
    for pruner, decoder in [("flowcut", "vista"), ("adaptinfer", "lqcd"), ("fastv", "iava"), ("none", "vcd"),
                            ("random", "m3id")]:
        vc = VirtualCuda()
        with vc:
            results = engine.generate(requests, GenerationSpec(pruning=pruner, budget=None if pruner == "none" else 16,
                                                               decoding=decoder, max_new_tokens=6))
        assert not vc.mismatches, f"{pruner} x {decoder}: {dict(vc.mismatches)}"
        assert all(r.error is None and r.token_ids for r in results)


def syncs_per_step(engine: Engine, n_requests: int, **spec) -> float:
    """Host syncs a decode step makes: the count over ten more generated tokens, divided by ten."""
    requests = [Request("describe the photo", [random_image(i, (40, 32))]) for i in range(n_requests)]
    counts = []
    for n in (3, 13):
        vc = VirtualCuda()
        with vc:
            results = engine.generate(requests, GenerationSpec(max_new_tokens=n, min_new_tokens=n, **spec))
        assert all(len(r.token_ids) == n for r in results)
        counts.append(sum(vc.syncs.values()))
    return (counts[1] - counts[0]) / 10


@pytest.mark.parametrize("decoder", list(DECODERS))
def test_a_decode_step_syncs_a_fixed_number_of_times(decoder, cuda_runtime):
    engine = gpu_engine(*FAMILIES["llava"](seed=0))
    # the step's tokens and NaN flags in one read, the decode mask check in another; M3ID reads which rows its
    # gate fired in a third
    base = 3 if decoder == "m3id" else 2
    params = DECODERS[decoder]
    for n in (1, 4):
        assert syncs_per_step(engine, n, decoding=decoder, decoding_params=params, diagnostics=False) == base
        # diagnostics ride on the tokens' read; every sampling row's distribution in one copy; logprobs one read
        assert syncs_per_step(engine, n, decoding=decoder, decoding_params=params, diagnostics=True) == base
        assert syncs_per_step(engine, n, decoding=decoder, decoding_params=params, do_sample=True, seed=1,
                              top_k=5, top_p=0.9, logprobs=2) == base + 2
