"""Prefix caching: the keys and values of prompt prefixes already computed, reused by later prompts
that start the same way (a shared system prompt, the earlier turns of a chat).

Prompts are cut into blocks of `block` tokens, as in vLLM's automatic prefix caching. A block is
keyed by its parent block's id, its own tokens and the request's LoRA slot (an adapter changes every
layer's keys and values; a slot id is never reused for other weights), so one key names one whole
prefix exactly: dict keys compare the tokens themselves, so two prefixes never collide. Each block
holds its KV as one tensor [layers, 2, kv heads, block, head dim]. Memory is bounded in bytes; the
least recently used blocks go first, and a chain is touched from its end back to its root so that
leaves are evicted before the blocks they extend.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class _Block:
    id: int
    kv: torch.Tensor  # [layers, 2, heads, block, dim]


class PrefixCache:
    def __init__(self, max_bytes: int, block: int = 16):
        self.max_bytes = max_bytes
        self.block = block
        self.bytes = 0
        self.queried = 0  # cumulative prompt tokens looked up
        self.hits = 0  # cumulative prompt tokens found (not computed again)
        self._blocks: OrderedDict[tuple, _Block] = OrderedDict()
        self._next_id = 1

    def lookup(self, tokens: list[int], adapter: int | None) -> tuple[int, torch.Tensor | None]:
        """The longest cached prefix of `tokens`, in whole blocks, leaving at least the last token to compute
        (its logits give the first output token): (tokens found, their KV [layers, 2, heads, found, dim])."""
        self.queried += len(tokens)
        keys, parent = [], 0
        for start in range(0, (len(tokens) - 1) // self.block * self.block, self.block):
            key = (parent, tuple(tokens[start:start + self.block]), adapter)
            found = self._blocks.get(key)
            if found is None:
                break
            keys.append(key)
            parent = found.id
        if not keys:
            return 0, None
        self._touch(keys)
        found = len(keys) * self.block
        self.hits += found
        return found, torch.cat([self._blocks[k].kv for k in keys], dim=3)

    def insert(self, tokens: list[int], adapter: int | None, kv: torch.Tensor) -> None:
        """Remember the whole blocks of `tokens`, whose KV is `kv` [layers, 2, heads, >= len(tokens), dim]."""
        keys, parent = [], 0
        for start in range(0, len(tokens) // self.block * self.block, self.block):
            key = (parent, tuple(tokens[start:start + self.block]), adapter)
            block = self._blocks.get(key)
            if block is None:
                block = _Block(self._next_id, kv[:, :, :, start:start + self.block].clone())
                self._next_id += 1
                self._blocks[key] = block
                self.bytes += block.kv.nbytes
            keys.append(key)
            parent = block.id
        if keys:
            self._touch(keys)
        while self.bytes > self.max_bytes and self._blocks:
            _, old = self._blocks.popitem(last=False)
            self.bytes -= old.kv.nbytes

    def clear(self) -> None:
        self._blocks.clear()
        self.bytes = 0

    def _touch(self, keys: list[tuple]) -> None:
        for key in reversed(keys):  # the root ends most recent: a chain is evicted from its end
            self._blocks.move_to_end(key)
