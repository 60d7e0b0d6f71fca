"""What only a GPU run would show, checked on a CPU: the CUDA calls are stood in for by recorders and fakes.

- synchronisation and memory/name queries go to the engine's GPU (``cuda:1``), not to the current device;
- the vision tower and projector run without autograd (their activations were kept for a backward pass);
- ``dtype auto`` picks float16 where bfloat16 is only emulated (T4, V100);
- FlashAttention-2 is not chosen (auto) and is refused (explicit) before Ampere, where its kernels do not run;
- a Ray replica given ``cuda:1`` runs on the one GPU Ray lets it see (``cuda:0`` there);
- ``perf serve`` on CUDA does not ask for two whole GPUs (its two apps run at once).
"""
from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vlmguard.errors import InvalidInput
from vlmguard.results import Request
from vlmguard.spec import GenerationSpec
from vlmguard.testing import random_image, tiny_engine

ROOT = Path(__file__).resolve().parents[1]
CUDA1 = torch.device("cuda", 1)


@pytest.fixture
def synced(monkeypatch) -> list:
    """``torch.cuda.synchronize`` recorded: the device each call named (None: the current device)."""
    calls: list = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    return calls


# ---- the engine's GPU, not the current one ------------------------------------------------------------------
def test_timing_helpers_wait_for_the_engines_gpu(monkeypatch, synced):
    from vlmguard.perf import timing

    timing.sync(CUDA1)
    assert synced == [CUDA1]
    synced.clear()
    reset: list = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: reset.append(device))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 100)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 350)
    with timing.MemoryMeter(CUDA1) as mem:
        pass
    assert synced == [CUDA1, CUDA1] and reset == [CUDA1] and mem.peak_bytes == 250


def test_environment_names_the_engines_gpu(monkeypatch):
    from vlmguard.perf import timing

    asked: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: asked.append(device) or "GPU")
    engine = SimpleNamespace(device=CUDA1, model_name="m", family="llava", model=SimpleNamespace(dtype=torch.bfloat16),
                             attn_implementation="vlmguard_sdpa", malloc_tuned=False)
    assert timing.environment(engine)["gpu"] == "GPU" and asked == [CUDA1]


def test_decode_step_waits_for_the_engines_gpu(synced):
    eng = tiny_engine("llava")
    spec = GenerationSpec(max_new_tokens=4, diagnostics=False)
    batch = eng.start_batch([Request("What is in the image?", [random_image(0)])], spec)
    try:
        batch.eos = set()  # the step must run its decode forward (random weights may pick an end token first)
        batch.device = CUDA1  # as on a GPU: the tensors stay on the CPU (a plain decoder builds none on the device)
        list(batch.advance())
        assert synced == [CUDA1]
    finally:
        batch.close()


def test_no_bare_synchronize_in_the_timed_paths():
    """``torch.cuda.synchronize()`` without a device waits for the current GPU (cuda:0), not an engine on cuda:N:
    its timings then end before the engine's work does. (The engine's two prefill syncs need a CUDA model to run.)"""
    for rel in ("vlmguard/engine.py", "vlmguard/decode_batch.py", "vlmguard/perf/timing.py"):
        text = (ROOT / rel).read_text()
        assert not re.search(r"torch\.cuda\.synchronize\(\s*\)", text), rel


# ---- no autograd in the vision path ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_vision_runs_without_autograd(family):
    eng = tiny_engine(family)
    module = eng.model.model.visual if family == "qwen2_vl" else eng.model.model.multi_modal_projector
    seen: list[tuple[bool, bool]] = []

    def hook(mod, args, out):
        t = out if isinstance(out, torch.Tensor) else out.pooler_output
        seen.append((torch.is_grad_enabled(), t.requires_grad))

    handle = module.register_forward_hook(hook)
    try:
        eng.generate([Request("Describe it.", [random_image(1)])], GenerationSpec(max_new_tokens=1))
    finally:
        handle.remove()
    assert seen and not any(grad or req for grad, req in seen), seen


# ---- dtype and attention by GPU generation --------------------------------------------------------------------
def test_auto_dtype_is_float16_where_bfloat16_is_emulated(monkeypatch):
    from vlmguard.engine import pick_dtype

    cuda = torch.device("cuda")
    # a T4 / V100: torch.cuda.is_bf16_supported() is True by emulation only
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert pick_dtype("auto", cuda) == torch.float16
    assert pick_dtype("bfloat16", cuda) == torch.bfloat16  # asked for: given
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere+
    assert pick_dtype("auto", cuda) == torch.bfloat16
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32


def test_flash_attention_needs_ampere(monkeypatch):
    import vlmguard.attention as attention

    cuda = torch.device("cuda")
    monkeypatch.setattr(attention, "flash_attention_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # T4
    assert attention.choose_attention("auto", cuda, torch.float16) == "vlmguard_sdpa"
    with pytest.raises(InvalidInput, match="Ampere or newer GPU .* 7.5: use --attn sdpa"):
        attention.choose_attention("flash_attention_2", cuda, torch.float16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # H100 / H200
    assert attention.choose_attention("auto", cuda, torch.bfloat16) == attention.FLASH
    assert attention.choose_attention("flash_attention_2", cuda, torch.float16) == attention.FLASH


# ---- Ray ----------------------------------------------------------------------------------------------------
def test_replica_runs_on_the_gpu_ray_gave_it(monkeypatch):
    from vlmguard.workers import deployment

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # CUDA_VISIBLE_DEVICES: the reserved GPU
    assert [deployment.replica_device(d) for d in ("cuda:1", "cuda:0", "cuda", "auto", "cpu")] == \
        ["cuda", "cuda:0", "cuda", "auto", "cpu"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # num_gpus: 2 - its second GPU
    assert deployment.replica_device("cuda:1") == "cuda:1"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)

    loaded: dict = {}

    class Worker:
        def __init__(self, model, **kwargs):
            loaded.update(kwargs)

    monkeypatch.setattr(deployment, "EngineWorker", Worker)
    deployment.ModelReplica({"model": "tiny", "device": "cuda:1"})
    assert loaded["device"] == "cuda"


@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_perf_serve_apps_share_one_gpu(monkeypatch, device):
    from vlmguard.perf.serve import _service_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # a one-GPU machine
    args = SimpleNamespace(shape="random:llava", device=device, dtype="auto", attn="auto", new_tokens=8, max_batch=8,
                           batch_wait_ms=10.0, batch_mode="inflight", ingress="model", direct_ingress=False)
    apps = [_service_config(args, batching, 1, [1, 4]) for batching in (False, True)]
    # both apps are deployed together: on a one-GPU machine their replicas must fit on that GPU
    assert sum(app.models[0].gpus_per_replica(1.0) for app in apps) <= 1.0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args.device = "auto"
    assert all(_service_config(args, b, 1, [1]).models[0].gpus_per_replica(0.0) == 0 for b in (False, True))


def test_flash_attention_on_a_cpu_device_is_refused_even_where_cuda_exists(monkeypatch):
    """A machine with CUDA and flash-attn, an engine asked for on the CPU: flash has no CPU kernels (it failed in
    the first forward)."""
    import vlmguard.attention as attention

    monkeypatch.setattr(attention, "flash_attention_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cpu = torch.device("cpu")
    assert attention.choose_attention("auto", cpu, torch.float32) == "vlmguard_sdpa"
    with pytest.raises(InvalidInput, match="flash_attention_2 runs on CUDA GPUs only, not on cpu: use --attn sdpa"):
        attention.choose_attention("flash_attention_2", cpu, torch.float32)
