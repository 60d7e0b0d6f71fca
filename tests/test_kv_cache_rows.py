"""GrowingLayer's in-place row changes (requests leaving and joining a running batch) give exactly the
tensors that gathering and concatenating give, and they stay in the layer's buffer when it has room."""
from __future__ import annotations

import random

import pytest
import torch

from vlmguard.kv_cache import GrowingCache, GrowingLayer, _move_rows_down


def _left_pad(x: torch.Tensor, length: int) -> torch.Tensor:
    pad = length - x.shape[-2]
    return torch.cat([x.new_zeros(*x.shape[:-2], pad, x.shape[-1]), x], dim=-2) if pad else x


class Reference:
    """What the layer must hold: plain gathers and concatenations."""

    def __init__(self, k, v):
        self.k, self.v = k, v

    def append(self, k, v):
        self.k, self.v = torch.cat([self.k, k], dim=-2), torch.cat([self.v, v], dim=-2)

    def keep(self, rows):
        self.k, self.v = self.k[rows], self.v[rows]

    def add(self, k, v):
        n = max(self.k.shape[-2], k.shape[-2])
        self.k = torch.cat([_left_pad(self.k, n), _left_pad(k, n)])
        self.v = torch.cat([_left_pad(self.v, n), _left_pad(v, n)])

    def trim(self, s):
        self.k, self.v = self.k[..., s:, :], self.v[..., s:, :]


def _block(rows, length, heads=2, dim=3):
    return torch.randn(rows, heads, length, dim), torch.randn(rows, heads, length, dim)


@pytest.mark.parametrize("seed", range(6))
def test_random_joins_leaves_trims_and_appends_match_gather_and_concatenate(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    layer = GrowingLayer()
    k, v = _block(4, 7)
    layer.update(k, v)
    ref = Reference(k, v)
    ops = {"append": 0, "leave": 0, "join": 0, "trim": 0, "reorder": 0}
    for _ in range(120):
        n = layer.keys.shape[0]
        op = rng.choice(["append"] * 4 + ["leave", "join", "trim", "reorder"])
        if op == "append":
            k, v = _block(n, 1)
            layer.update(k, v)
            ref.append(k, v)
        elif op == "leave" and n > 1:
            rows = sorted(rng.sample(range(n), rng.randint(1, n - 1)))
            layer.keep_rows(rows, torch.tensor(rows))
            ref.keep(rows)
        elif op == "join" and n < 12:
            k, v = _block(rng.randint(1, 4), rng.randint(1, layer.keys.shape[-2] + 6))
            layer.add_rows(k, v)
            ref.add(k, v)
        elif op == "trim" and layer.keys.shape[-2] > 2:
            s = rng.randint(1, 2)  # what LayerRunner.reorder does with slots no row attends to
            layer.keys, layer.values = layer.keys[..., s:, :], layer.values[..., s:, :]
            ref.trim(s)
        elif op == "reorder":  # any other selection (duplicates, another order) gathers
            rows = [rng.randrange(n) for _ in range(n)]
            layer.keep_rows(rows, torch.tensor(rows))
            ref.keep(rows)
        else:
            continue
        ops[op] += 1
        assert torch.equal(layer.keys, ref.k) and torch.equal(layer.values, ref.v), op
    assert all(ops.values()), ops


def test_a_leaving_row_moves_the_others_down_inside_the_buffer():
    torch.manual_seed(0)
    layer = GrowingLayer()
    k, v = _block(5, 6)
    layer.update(k, v)
    layer.update(*_block(5, 1))  # the first append moves the prefill into a buffer with room
    buf = layer._kbuf
    before = layer.keys.clone()
    layer.keep_rows([0, 2, 3], torch.tensor([0, 2, 3]))
    assert layer._kbuf is buf and layer.keys.data_ptr() == buf.data_ptr()
    assert torch.equal(layer.keys, before[[0, 2, 3]])
    layer.update(*_block(3, 1))  # the next step appends in place: no new buffer
    assert layer._kbuf is buf


def test_joining_rows_fill_the_rows_left_by_others_and_room_at_the_front():
    torch.manual_seed(1)
    layer = GrowingLayer()
    layer.update(*_block(4, 10))
    layer.update(*_block(4, 1))
    buf = layer._kbuf
    layer.keep_rows([1, 3], torch.tensor([1, 3]))
    layer.keys, layer.values = layer.keys[..., 3:, :], layer.values[..., 3:, :]  # 3 free slots in front
    ref = Reference(layer.keys.clone(), layer.values.clone())
    shorter, longer = _block(1, 4), _block(1, layer.keys.shape[-2] + 3)
    for k, v in (shorter, longer):  # a shorter joiner is padded; a longer one pads the batch into the free slots
        layer.add_rows(k, v)
        ref.add(k, v)
        assert layer._kbuf is buf
        assert torch.equal(layer.keys, ref.k) and torch.equal(layer.values, ref.v)
    k, v = _block(1, 2)  # no spare row left: the layer moves to a new buffer
    layer.add_rows(k, v)
    ref.add(k, v)
    assert layer._kbuf is not buf
    assert torch.equal(layer.keys, ref.k) and torch.equal(layer.values, ref.v)


def test_move_rows_down_handles_runs_longer_than_their_shift():
    x = torch.arange(10.0)[:, None].repeat(1, 3)
    rows = [0, 3, 4, 5, 6, 7, 9]  # a run of five rows shifted by two, then one row shifted by three
    _move_rows_down(x, rows)
    assert x[:7, 0].tolist() == [float(r) for r in rows]


def test_cache_keep_rows_applies_to_every_layer_and_skips_empty_ones():
    torch.manual_seed(2)
    cache = GrowingCache()
    for i in range(3):
        cache.update(*_block(4, 5), i)
        cache.update(*_block(4, 1), i)
    want = [cache.layers[i].keys[[0, 3]].clone() for i in range(3)]
    cache.keep_rows([0, 3], torch.tensor([0, 3]))
    assert all(torch.equal(cache.layers[i].keys, want[i]) for i in range(3))
