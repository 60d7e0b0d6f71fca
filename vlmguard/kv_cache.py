"""A transformers ``DynamicCache`` whose layers append, drop rows and take in joining rows in place.

``DynamicLayer.update`` does ``keys = torch.cat([keys, new])``: each decode step copies the whole cache of
every layer (O(context) bytes per layer per step). On a CPU at batch 1 that copy costs as much as the weight
reads of the step itself. :class:`GrowingLayer` keeps the cache in storage with spare room along the
sequence axis (capacity grows by a quarter, at least 64 slots, when full) and writes the new token into
it; ``keys``/``values`` stay views of a window of that storage (its first rows, a run of slots), so every
reader of a ``DynamicCache`` sees the same tensors (values) as before.

In-flight batching changes the rows between steps, and that used to cost two copies of the whole cache
each time (``batch_select_indices`` gathers a new tensor, and the next append moves it into a fresh
buffer). Here a request leaving moves only the rows after it down, inside the storage
(:meth:`GrowingLayer.keep_rows`); its rows become spare, and requests joining are written into spare rows
(:meth:`GrowingLayer.add_rows`), with room at the front of the window for the longer side's left padding.
Only when the storage has no room does a layer move to a new buffer (:meth:`GrowingLayer.fill_rows`).
Any code that replaces ``keys``/``values`` with tensors of its own (``reorder_cache``, ``crop``,
offloading) simply makes the next append start a fresh buffer.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

MIN_HEADROOM = 64


def _window_start(view: torch.Tensor, buf: torch.Tensor) -> int | None:
    """The slot where ``view`` starts when it is ``buf[:rows, ..., start:start + n, :]``, else None."""
    if (view.untyped_storage().data_ptr() != buf.untyped_storage().data_ptr() or view.stride() != buf.stride()
            or view.shape[1:-2] != buf.shape[1:-2] or view.shape[-1] != buf.shape[-1]
            or view.shape[0] > buf.shape[0]):
        return None
    start, rest = divmod(view.storage_offset() - buf.storage_offset(), buf.stride(-2))
    if rest or start < 0 or start + view.shape[-2] > buf.shape[-2]:
        return None  # (a view that starts past the first row's slots lands here too)
    return start


def _move_rows_down(window: torch.Tensor, rows: list[int]) -> None:
    """``window[i] := window[rows[i]]`` for ascending ``rows`` with ``rows[i] >= i``, in place. Runs of
    consecutive rows move as blocks no larger than their shift, so no block overlaps its own source."""
    i, m = 0, len(rows)
    while i < m:
        src = rows[i]
        run = 1
        while i + run < m and rows[i + run] == src + run:
            run += 1
        shift = src - i
        if shift:
            for c in range(0, run, shift):
                n = min(shift, run - c)
                window[i + c:i + c + n].copy_(window[src + c:src + c + n])
        i += run


class GrowingLayer(DynamicLayer):
    """``DynamicLayer`` with amortised O(1) appends and in-place row changes (see module doc)."""

    _kbuf: torch.Tensor | None = None
    _vbuf: torch.Tensor | None = None

    def _start(self) -> int | None:
        """Where the window starts while ``keys``/``values`` are still windows of our buffers (nobody
        replaced them), else None."""
        kb, vb = self._kbuf, self._vbuf
        if kb is None or vb is None or self.keys is None or self.values is None:
            return None
        k, v = self.keys, self.values
        start = _window_start(k, kb)
        if start is None or _window_start(v, vb) != start or k.shape[0] != v.shape[0] or k.shape[-2] != v.shape[-2]:
            return None
        return start

    def _set_window(self, rows: int, start: int, length: int) -> None:
        self.keys = self._kbuf[:rows, ..., start:start + length, :]
        self.values = self._vbuf[:rows, ..., start:start + length, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        # (a layer whose rows all left, (0, H, S, D), still has its S slots: it appends, as DynamicLayer does)
        if not self.is_initialized or self.keys is None or self.keys.dim() < 2 or self.keys.shape[-2] == 0:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            # First fill (prefill): keep the tensors as they are; the first append moves them to a buffer.
            self.keys, self.values = key_states, value_states
            self._kbuf = self._vbuf = None
            return self.keys, self.values
        rows, old, add = self.keys.shape[0], self.keys.shape[-2], key_states.shape[-2]
        new = old + add
        start = self._start()
        if start is None or start + new > self._kbuf.shape[-2]:
            self.fill_rows([self.keys], [self.values], old, room=new)
            start = 0
        self._kbuf[:rows, ..., start + old:start + new, :] = key_states
        self._vbuf[:rows, ..., start + old:start + new, :] = value_states
        self._set_window(rows, start, new)
        return self.keys, self.values

    def reset(self) -> None:
        self._kbuf = self._vbuf = None
        super().reset()

    def fill_rows(self, keys: list[torch.Tensor], values: list[torch.Tensor], length: int,
                  room: int | None = None) -> None:
        """Become the row blocks ``keys``/``values`` (B_i, H, S_i, D) stacked along the batch axis, each
        left-padded with zeros to ``length`` slots, written once into a new buffer with room for appends
        (``room``: the slots it must hold at least, default ``length``)."""
        self.lazy_initialization(keys[0], values[0])
        room = length if room is None else room
        cap = room + max(MIN_HEADROOM, room // 4)
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
        self._set_window(rows, 0, length)

    def keep_rows(self, rows: list[int], index: torch.Tensor) -> None:
        """Keep only the rows ``rows`` (``index``: the same on the cache's device). Ascending distinct rows
        (requests leaving) move down inside the buffer; any other selection gathers (``batch_select_indices``)."""
        start = self._start()
        ascending = all(a < b for a, b in zip(rows, rows[1:])) and (not rows or rows[0] >= 0)
        if start is None or not ascending or (rows and rows[-1] >= self.keys.shape[0]):
            self.batch_select_indices(index)
            return
        length = self.keys.shape[-2]
        for buf in (self._kbuf, self._vbuf):
            _move_rows_down(buf[:, ..., start:start + length, :], rows)
        self._set_window(len(rows), start, length)

    def add_rows(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append the row block ``keys``/``values`` (B, H, S, D) after the current rows; whichever side is
        shorter is left-padded with zeros to the longer length (``fill_rows``' layout). Written into the
        buffer's spare rows and the free slots in front of the window when they suffice, else into a new
        buffer."""
        start, have = self._start(), self.keys.shape[0]
        old, add = self.keys.shape[-2], keys.shape[-2]
        length = max(old, add)
        if (start is None or start < length - old or have + keys.shape[0] > self._kbuf.shape[0]
                or keys.shape[1:-2] != self.keys.shape[1:-2]):
            self.fill_rows([self.keys, keys], [self.values, values], length)
            return
        first = start - (length - old)
        rows = have + keys.shape[0]
        for buf, x in ((self._kbuf, keys), (self._vbuf, values)):
            if first < start:  # the current rows' new left padding
                buf[:have, ..., first:start, :] = 0
            pad = length - add
            if pad:
                buf[have:rows, ..., first:first + pad, :] = 0
            buf[have:rows, ..., first + pad:first + length, :] = x
        self._set_window(rows, first, length)


class GrowingCache(DynamicCache):
    """A ``DynamicCache`` (same API and type) built of :class:`GrowingLayer`s."""

    def __init__(self) -> None:
        Cache.__init__(self, layer_class_to_replicate=GrowingLayer)

    def fill_layer(self, layer_idx: int, keys: list[torch.Tensor], values: list[torch.Tensor], length: int,
                   room: int | None = None) -> None:
        """Layer ``layer_idx`` := the left-padded row blocks (see :meth:`GrowingLayer.fill_rows`)."""
        while len(self.layers) <= layer_idx:
            self.layers.append(GrowingLayer())
        self.layers[layer_idx].fill_rows(keys, values, length, room=room)

    def keep_rows(self, rows: list[int], index: torch.Tensor) -> None:
        """Keep only the rows ``rows`` of every layer (see :meth:`GrowingLayer.keep_rows`)."""
        for layer in self.layers:
            if isinstance(layer, GrowingLayer) and layer.get_seq_length() > 0:
                layer.keep_rows(rows, index)
            else:
                layer.batch_select_indices(index)
