"""A batched KV cache whose rows can join and leave between decode steps.

Rows are left-padded to one shared length, so every decode step is one dense forward over the
whole batch. Each layer preallocates capacity and grows by doubling, so a decode step writes one
new column instead of copying the whole cache as transformers' DynamicLayer (torch.cat) does.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class SlotLayer(DynamicLayer):
    """One layer's keys and values: buffers [batch, heads, capacity, dim], the first `length` used."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.length = 0
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _reserve(self, needed: int, like_k: torch.Tensor, like_v: torch.Tensor) -> None:
        capacity = 0 if self._k is None else self._k.shape[-2]
        if needed <= capacity:
            return
        capacity = max(needed, 2 * capacity, 64)
        b, h, _, d = like_k.shape
        new_k = like_k.new_zeros((b, h, capacity, d))
        new_v = like_v.new_zeros((b, h, capacity, like_v.shape[-1]))
        if self._k is not None and self.length:
            new_k[:, :, : self.length] = self._k[:, :, : self.length]
            new_v[:, :, : self.length] = self._v[:, :, : self.length]
        self._k, self._v = new_k, new_v

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self._reserve(end, key_states, value_states)
        self._k[:, :, self.length : end] = key_states
        self._v[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def step_buffers(self, columns: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole key/value buffers, with room for `columns` more (a compiled step writes them) and one
        spare: a compiled graph reads `[:length]` as a strict slice, and a full buffer would need another graph."""
        self._reserve(self.length + columns + 1, self._k, self._v)
        return self._k, self._v

    def advance(self, columns: int) -> None:
        """`columns` more positions were written past `length` (by a compiled step)."""
        self.length += columns
        self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]

    def adopt(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        """Take these buffers ([batch, heads, capacity >= length, dim]) as the layer's, `length` columns used."""
        self._k, self._v, self.length = keys, values, length
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]

    def set(self, keys: torch.Tensor, values: torch.Tensor, spare: int = 0) -> None:
        """Replace the contents with `keys`/`values` (already aligned), keeping `spare` free columns."""
        self._k = self._v = None
        self.length = 0
        self._reserve(keys.shape[-2] + spare, keys, values)
        self.update(keys, values)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._k is not None:
            self._k = self._k.index_select(0, indices)
            self._v = self._v.index_select(0, indices)
            self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]

    def truncate(self, length: int) -> None:
        """Forget every column from `length` on (a draft's rejected tokens); capacity is kept."""
        if self._k is not None and length < self.length:
            self.length = length
            self.keys, self.values = self._k[:, :, :length], self._v[:, :, :length]

    def gather(self, columns: torch.Tensor) -> None:
        """Keep, for each row b, the columns columns[b] (in that order): [batch, new length]."""
        if self._k is None:
            return
        index = columns[:, None, :, None]
        keys = torch.gather(self.keys, 2, index.expand(-1, self.keys.shape[1], -1, self.keys.shape[-1]))
        values = torch.gather(self.values, 2, index.expand(-1, self.values.shape[1], -1, self.values.shape[-1]))
        self.set(keys, values, spare=max(64, keys.shape[-2] // 2))

    def drop_front(self, columns: int) -> None:
        """Forget the first `columns` positions (padding that no remaining row needs)."""
        if columns <= 0 or self._k is None:
            return
        keep_k = self._k[:, :, columns : self.length].clone()
        keep_v = self._v[:, :, columns : self.length].clone()
        self.set(keep_k, keep_v, spare=self._k.shape[-2] - self.length)


class BatchCache(Cache):
    def __init__(self, num_layers: int):
        super().__init__(layers=[SlotLayer() for _ in range(num_layers)])

    @property
    def length(self) -> int:
        return self.layers[0].length

    def select(self, indices: torch.Tensor) -> None:
        for layer in self.layers:
            layer.batch_select_indices(indices)

    def truncate(self, length: int) -> None:
        for layer in self.layers:
            layer.truncate(length)

    def gather(self, columns: torch.Tensor) -> None:
        for layer in self.layers:
            layer.gather(columns)

    def drop_front(self, columns: int) -> None:
        for layer in self.layers:
            layer.drop_front(columns)

    def step_buffers(self, columns: int = 1) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
        """Each layer's key and value buffers with room for `columns` more, and the first one's index."""
        buffers = [layer.step_buffers(columns) for layer in self.layers]
        return [k for k, _ in buffers], [v for _, v in buffers], self.length

    def advance(self, columns: int) -> None:
        for layer in self.layers:
            layer.advance(columns)

    def nbytes(self) -> int:
        """Bytes the key/value buffers hold, reserved columns included (what the process spends)."""
        return sum(layer._k.nbytes + layer._v.nbytes for layer in self.layers if layer._k is not None)


def merge(a: BatchCache | None, a_mask: torch.Tensor | None, b: BatchCache, b_mask: torch.Tensor):
    """Stack the rows of `b` under those of `a`, left-padding the shorter one. Returns (cache, mask).
    Each layer's rows are copied once, straight into the new buffers (a c=16 profile spent ~15% of the
    engine thread here when it concatenated and then copied again into buffers it had zeroed)."""
    if a is None or a_mask is None or a_mask.shape[0] == 0:
        return b, b_mask
    length = max(a.length, b.length)
    spare = max(64, length // 2)
    merged = BatchCache(len(a.layers))
    for out, la, lb in zip(merged.layers, a.layers, b.layers):
        out.adopt(_stacked(la.keys, lb.keys, length, spare), _stacked(la.values, lb.values, length, spare), length)
    mask = torch.cat([_left_pad_mask(a_mask, length), _left_pad_mask(b_mask, length)], dim=0)
    return merged, mask


def _stacked(top: torch.Tensor, bottom: torch.Tensor, length: int, spare: int) -> torch.Tensor:
    """top's rows over bottom's in one new buffer [rows, heads, length + spare, dim], each right-aligned at
    `length`, zeros to its left (padding must stay finite: attention gives it a zero weight, and 0 x NaN
    would not be 0); the spare columns are written before they are read."""
    out = top.new_empty((top.shape[0] + bottom.shape[0], top.shape[1], length + spare, top.shape[-1]))
    row = 0
    for part in (top, bottom):
        rows, pad = part.shape[0], length - part.shape[-2]
        out[row:row + rows, :, :pad].zero_()
        out[row:row + rows, :, pad:length] = part
        row += rows
    return out


def _left_pad_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - mask.shape[1]
    if missing == 0:
        return mask
    return torch.cat([mask.new_zeros((mask.shape[0], missing)), mask], dim=1)


# ---- one sequence's KV on its own, [layers, 2, heads, length, dim]: prefix cache blocks, chunked prefill ----
def stack_rows(rows: list[torch.Tensor | None], num_layers: int, spare: int = 0) -> tuple[BatchCache, torch.Tensor]:
    """A BatchCache of these sequences' KV (None: nothing yet), left-padded to the longest, with `spare`
    free columns; and its mask [rows, length]."""
    length = max((0 if r is None else r.shape[3]) for r in rows)
    cache = BatchCache(num_layers)
    like = next((r for r in rows if r is not None), None)
    device = like.device if like is not None else None
    mask = torch.zeros((len(rows), length), dtype=torch.long, device=device)
    if like is None:
        return cache, mask
    layers, _, heads, _, dim = like.shape
    kv = like.new_zeros((layers, 2, len(rows), heads, length, dim))
    for i, r in enumerate(rows):
        if r is not None and r.shape[3]:
            kv[:, :, i, :, length - r.shape[3]:] = r
            mask[i, length - r.shape[3]:] = 1
    for layer, (keys, values) in zip(cache.layers, kv):
        layer.set(keys, values, spare=spare)
    return cache, mask


def row_kv(cache: BatchCache, mask: torch.Tensor, row: int) -> torch.Tensor:
    """One row's live columns (mask 1), in order, as [layers, 2, heads, length, dim]."""
    live = torch.nonzero(mask[row]).squeeze(1)
    return torch.stack([torch.stack([layer.keys[row].index_select(1, live), layer.values[row].index_select(1, live)])
                        for layer in cache.layers])
