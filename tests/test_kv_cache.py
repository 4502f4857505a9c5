"""kv_cache.merge: rows of a running batch and of newly prefilled sequences stacked into one left-padded
cache, whichever side is longer; padding zeros, room for the next columns."""

from __future__ import annotations

import torch

from server.engines.torch.kv_cache import merge, row_kv, stack_rows

LAYERS, HEADS, DIM = 2, 3, 4


def _seq(length: int, seed: int) -> torch.Tensor:
    return torch.randn((LAYERS, 2, HEADS, length, DIM), generator=torch.Generator().manual_seed(seed))


def _expected(rows: list[torch.Tensor], length: int) -> torch.Tensor:
    out = torch.zeros((LAYERS, 2, len(rows), HEADS, length, DIM))
    for i, r in enumerate(rows):
        out[:, :, i, :, length - r.shape[3]:] = r
    return out


def test_merge_left_pads_the_shorter_side_either_way():
    for a_lengths, b_lengths in (([5, 9], [3]), ([4], [7, 2]), ([6], [6])):
        a_rows = [_seq(n, i) for i, n in enumerate(a_lengths)]
        b_rows = [_seq(n, 10 + i) for i, n in enumerate(b_lengths)]
        a, a_mask = stack_rows(a_rows, LAYERS)
        b, b_mask = stack_rows(b_rows, LAYERS)
        merged, mask = merge(a, a_mask, b, b_mask)
        length = max(a_lengths + b_lengths)
        want = _expected(a_rows + b_rows, length)
        assert merged.length == length and mask.shape == (len(a_rows + b_rows), length)
        for i, layer in enumerate(merged.layers):
            assert torch.equal(layer.keys, want[i, 0]) and torch.equal(layer.values, want[i, 1])
            assert layer._k.shape[2] >= length + 64  # room for the next decode steps
        for i, r in enumerate(a_rows + b_rows):
            assert int(mask[i].sum()) == r.shape[3]
            assert torch.equal(row_kv(merged, mask, i), r)


def test_a_merged_cache_takes_new_columns():
    a, a_mask = stack_rows([_seq(3, 1)], LAYERS)
    b, b_mask = stack_rows([_seq(5, 2)], LAYERS)
    merged, _ = merge(a, a_mask, b, b_mask)
    new = torch.ones((2, HEADS, 1, DIM))
    keys, values = merged.layers[0].update(new, new)
    assert keys.shape[2] == 6 and torch.equal(keys[:, :, -1:], new) and torch.equal(values[:, :, :5], merged.layers[0]._v[:, :, :5])
