"""A CUDA device emulated on the CPU, to find what a GPU run would refuse without one.

Inside ``VirtualCuda`` every tensor is computed on the CPU, but each one carries a *placement*: on the
(virtual) GPU ``cuda:0`` or on the host. The model's parameters and buffers are put on the GPU
(``put_on_gpu``); ``Tensor.device`` reports the placement, so ``model.device`` and ``x.device`` read
``cuda:0`` and every code path that branches on the device takes its CUDA branch. Placement follows the
rules of a real CUDA run:

* a tensor made without a device (``torch.tensor``, ``torch.zeros``, ``torch.from_numpy``, a processor's
  output) is on the host; ``device="cuda"`` / ``.to(device)`` / ``.cuda()`` put it on the GPU, ``.cpu()``
  brings it back (each a copy, as across real devices);
* an op's result is where its inputs are; ``*_like`` / ``new_*`` follow their input unless given a device.

What a real GPU refuses is recorded in ``mismatches`` (the op, its call site, the shapes): an op whose inputs
are on both sides, except what CUDA itself allows, a 0-dim host tensor used as a scalar, a host index tensor
used to index a GPU tensor, and copies. Reads that make the host wait for the GPU (``.item()``,
``.tolist()``, ``bool()``, ``nonzero()``, a copy to the host, ...) on a GPU tensor are counted in ``syncs``
by call site.

CUDA's own calls (``torch.cuda.synchronize`` and the memory statistics) are the caller's to stand in for
(``fake_cuda_runtime``): this machine has no CUDA runtime. Not emulated: kernels and their numerics, streams,
memory, and ``from_pretrained`` (load the model outside the mode, then ``put_on_gpu`` it).
"""
from __future__ import annotations

import collections
import traceback
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

GPU = torch.device("cuda", 0)
CPU = torch.device("cpu")
_ON_HOST = "_vlmguard_on_host"
_ROOT = str(Path(__file__).resolve().parents[1]) + "/"
T = torch.Tensor
# reads whose value the host needs now: on a GPU each waits for the queued work to finish
_SYNCING = {T.item, T.tolist, T.__bool__, T.__int__, T.__float__, T.__index__, T.nonzero, T.numpy,
            torch.nonzero, T.masked_select, torch.masked_select, T.unique, torch.unique, torch.equal, T.equal}


def on_host(t: torch.Tensor) -> bool:
    return bool(getattr(t, _ON_HOST, True))


def _place(out, host: bool):
    for t in tree_flatten(out)[0]:
        if isinstance(t, torch.Tensor):
            try:
                setattr(t, _ON_HOST, host)
            except (AttributeError, RuntimeError):  # e.g. a tensor subclass without a __dict__
                pass
    return out


def put_on_gpu(module: torch.nn.Module) -> None:
    """Place a module's parameters and buffers on the virtual GPU (they stay in CPU memory)."""
    for t in list(module.parameters()) + list(module.buffers()):
        setattr(t, _ON_HOST, False)


def _is_device(x) -> bool:
    return isinstance(x, torch.device) or (isinstance(x, str) and x.split(":")[0] in ("cpu", "cuda", "meta"))


def _target(x) -> torch.device:
    return torch.device(x) if isinstance(x, str) else x


def _on_cpu(x):
    """The device actually used for a named one: the CPU for the virtual GPU, any other as named."""
    return CPU if _is_device(x) and _target(x).type == "cuda" else x


def _getter(func, name: str) -> bool:
    """Whether ``func`` reads the tensor attribute ``name`` (a property's getter)."""
    owner = getattr(func, "__self__", None)
    return getattr(func, "__name__", "") == "__get__" and getattr(owner, "__name__", "") == name


class VirtualCuda(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.mismatches: collections.Counter = collections.Counter()
        self.syncs: collections.Counter = collections.Counter()

    # ---- reporting -------------------------------------------------------------------------------------------
    @staticmethod
    def _site() -> str:
        frames = [f for f in traceback.extract_stack()
                  if f.filename.startswith(_ROOT) and "/.venv/" not in f.filename
                  and not f.filename.endswith("device_emulation.py")]
        return " <- ".join(f"{f.filename[len(_ROOT):]}:{f.lineno}" for f in frames[::-1][:3]) or "?"

    def _mismatch(self, func, what: str) -> None:
        self.mismatches[f"{getattr(func, '__name__', func)} at {self._site()}: {what}"] += 1

    # ---- the mode ----------------------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _getter(func, "device"):
            return CPU if on_host(args[0]) else GPU
        if _getter(func, "is_cuda"):
            return not on_host(args[0])
        if func is T.get_device:
            return -1 if on_host(args[0]) else 0
        if func is T.pin_memory:
            return args[0]
        if func is torch.device:  # constructing a device object: nothing to place
            return func(*args, **kwargs)
        if func in (T.cuda, T.cpu):
            return self._moved(args[0], args[0], to_host=func is T.cpu)
        if func is T.to:
            return self._to(func, args, kwargs)

        # a device named in the call: the result goes there (the computation stays on the CPU)
        named = [a for a in list(args) + [kwargs.get("device")] if _is_device(a)]
        if "device" in kwargs:
            kwargs["device"] = _on_cpu(kwargs["device"])
        args = tuple(_on_cpu(a) for a in args)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]

        if func in _SYNCING and tensors and not on_host(tensors[0]):
            self.syncs[self._site()] += 1
        if func in (T.__getitem__, T.__setitem__):
            self._check_indexing(func, args)
        elif func is not T.copy_:
            self._check_mixing(func, tensors)
        out = func(*args, **kwargs)
        if named:
            return _place(out, _target(named[0]).type != "cuda")
        if func is T.copy_:
            return out
        if tensors:
            return _place(out, all(on_host(t) for t in tensors))
        return _place(out, True)  # made from Python data without a device: on the host

    def _to(self, func, args, kwargs):
        src, rest = args[0], list(args[1:])
        dev = kwargs.get("device")
        other = next((a for a in rest if isinstance(a, torch.Tensor)), kwargs.get("other"))
        if dev is None:
            dev = next((a for a in rest if _is_device(a)), None)
        if dev is None and isinstance(other, torch.Tensor):
            dev = CPU if on_host(other) else GPU
        rest = [_on_cpu(a) for a in rest]
        if "device" in kwargs:
            kwargs["device"] = _on_cpu(kwargs["device"])
        out = func(src, *rest, **kwargs)
        if dev is None:  # a dtype change only: stays where it was
            return _place(out, on_host(src))
        return self._moved(src, out, to_host=_target(dev).type != "cuda")

    def _moved(self, src: torch.Tensor, out: torch.Tensor, to_host: bool) -> torch.Tensor:
        """``out`` (``src``'s data, possibly ``src`` itself) placed on the target side: across devices it is a
        copy, and a copy to the host waits for the GPU."""
        if on_host(src) != to_host:
            if to_host:
                self.syncs[self._site()] += 1
            if out is src:
                out = src.clone()
        return _place(out, to_host)

    def _check_mixing(self, func, tensors: list[torch.Tensor]) -> None:
        host = [t for t in tensors if on_host(t)]
        gpu = [t for t in tensors if not on_host(t)]
        if not host or not gpu:
            return
        # CUDA takes a 0-dim host tensor as a scalar beside GPU tensors; nothing else crosses
        if all(t.dim() == 0 for t in host):
            return
        self._mismatch(func, f"host {[tuple(t.shape) for t in host][:3]} with GPU {[tuple(t.shape) for t in gpu][:3]}")

    def _check_indexing(self, func, args) -> None:
        base, key = args[0], args[1]
        index = [t for t in tree_flatten(key)[0] if isinstance(t, torch.Tensor)]
        value = args[2] if func is T.__setitem__ and isinstance(args[2], torch.Tensor) else None
        if on_host(base) and any(not on_host(t) for t in index):
            self._mismatch(func, "GPU indices into a host tensor")
        # a GPU tensor may be indexed by host index tensors; values written at tensor indices must be on the
        # indexed tensor's side (where the indices are slices, the write is a copy, which may cross)
        if value is not None and index and on_host(value) != on_host(base) and value.dim() > 0:
            self._mismatch(func, f"values {tuple(value.shape)} written at tensor indices across devices")


def fake_cuda_runtime(monkeypatch) -> list:
    """Stand-ins for the CUDA runtime calls the engine makes on a GPU; returns the synchronize calls made."""
    calls: list = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for name in ("reset_peak_memory_stats", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda device=None: None)
    for name in ("max_memory_allocated", "memory_allocated", "max_memory_reserved", "memory_reserved"):
        monkeypatch.setattr(torch.cuda, name, lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "virtual GPU")
    return calls
