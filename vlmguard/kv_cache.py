"""A transformers ``DynamicCache`` whose layers append in place instead of re-concatenating every step.

``DynamicLayer.update`` does ``keys = torch.cat([keys, new])``: each decode step copies the whole cache of
every layer (O(context) bytes per layer per step). On a CPU at batch 1 that copy costs as much as the weight
reads of the step itself. :class:`GrowingLayer` keeps the cache in storage with spare room along the
sequence axis (capacity grows by a quarter, at least 64 slots, when full) and writes the new token into
it; ``keys``/``values`` stay views of the filled part, so every reader of a ``DynamicCache`` sees the same
tensors (values) as before. Any code that replaces ``keys``/``values`` (``batch_select_indices``,
``reorder_cache``, ``crop``, offloading) simply makes the next append start a fresh buffer.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

MIN_HEADROOM = 64


class GrowingLayer(DynamicLayer):
    """``DynamicLayer`` with amortised O(1) appends (see module doc)."""

    _kbuf: torch.Tensor | None = None
    _vbuf: torch.Tensor | None = None

    def _owns(self) -> bool:
        """True while ``keys``/``values`` are still the views of our buffers (nobody replaced them)."""
        kb, vb = self._kbuf, self._vbuf
        if kb is None or vb is None or self.keys is None or self.values is None:
            return False
        k, v = self.keys, self.values
        return (k.data_ptr() == kb.data_ptr() and v.data_ptr() == vb.data_ptr()
                and k.shape[:-2] == kb.shape[:-2] and v.shape[:-2] == vb.shape[:-2]
                and k.stride() == kb.stride() and v.stride() == vb.stride())

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized or self.keys is None or self.keys.numel() == 0:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            # First fill (prefill): keep the tensors as they are; the first append moves them to a buffer.
            self.keys, self.values = key_states, value_states
            self._kbuf = self._vbuf = None
            return self.keys, self.values
        old, add = self.keys.shape[-2], key_states.shape[-2]
        new = old + add
        if not self._owns() or self._kbuf.shape[-2] < new:
            cap = new + max(MIN_HEADROOM, new // 4)
            kbuf = self.keys.new_empty((*self.keys.shape[:-2], cap, self.keys.shape[-1]))
            vbuf = self.values.new_empty((*self.values.shape[:-2], cap, self.values.shape[-1]))
            kbuf[..., :old, :] = self.keys
            vbuf[..., :old, :] = self.values
            self._kbuf, self._vbuf = kbuf, vbuf
        self._kbuf[..., old:new, :] = key_states
        self._vbuf[..., old:new, :] = value_states
        self.keys = self._kbuf[..., :new, :]
        self.values = self._vbuf[..., :new, :]
        return self.keys, self.values

    def reset(self) -> None:
        self._kbuf = self._vbuf = None
        super().reset()

    def fill_rows(self, keys: list[torch.Tensor], values: list[torch.Tensor], length: int) -> None:
        """Become the row blocks ``keys``/``values`` (B_i, H, S_i, D) stacked along the batch axis, each
        left-padded with zeros to ``length`` slots, written once into a buffer with room for appends."""
        self.lazy_initialization(keys[0], values[0])
        cap = length + max(MIN_HEADROOM, length // 4)
        rows = sum(k.shape[0] for k in keys)
        bufs = []
        for parts in (keys, values):
            first = parts[0]
            buf = first.new_empty((rows, *first.shape[1:-2], cap, first.shape[-1]))
            r = 0
            for x in parts:
                pad = length - x.shape[-2]
                if pad:
                    buf[r:r + x.shape[0], ..., :pad, :] = 0
                buf[r:r + x.shape[0], ..., pad:length, :] = x
                r += x.shape[0]
            bufs.append(buf)
        self._kbuf, self._vbuf = bufs
        self.keys, self.values = self._kbuf[..., :length, :], self._vbuf[..., :length, :]


class GrowingCache(DynamicCache):
    """A ``DynamicCache`` (same API and type) built of :class:`GrowingLayer`s."""

    def __init__(self) -> None:
        Cache.__init__(self, layer_class_to_replicate=GrowingLayer)

    def fill_layer(self, layer_idx: int, keys: list[torch.Tensor], values: list[torch.Tensor], length: int) -> None:
        """Layer ``layer_idx`` := the left-padded row blocks (see :meth:`GrowingLayer.fill_rows`)."""
        while len(self.layers) <= layer_idx:
            self.layers.append(GrowingLayer())
        self.layers[layer_idx].fill_rows(keys, values, length)
