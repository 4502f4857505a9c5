"""Model execution for the batch scheduler: the running rows' KV cache and attention mask, a padded
prefill of new rows, one decode step for every row, and dropping finished rows from the cache."""

from __future__ import annotations

import torch

from server.engines.torch.kv_cache import BatchCache, merge, row_kv, stack_rows

_TRIM_MIN_COLUMNS = 32


class ModelRunner:
    def __init__(self, model, device: torch.device, pad_id: int):
        self.model = model
        self.device = device
        self.pad_id = pad_id
        self.num_layers = model.config.get_text_config().num_hidden_layers
        self.cache: BatchCache | None = None
        self.mask: torch.Tensor | None = None
        self.compactions = 0  # holes left by rejected drafts squeezed out (a test reads it)
        self.compiled = None  # compiled_decode.CompiledDecode, set by the engine once it has compiled
        from server.engines.torch.attention import NAME

        self.grouped_queries = getattr(model.config, "_attn_implementation", None) == NAME

    def kv_tokens(self, rows: int) -> int:
        return 0 if self.cache is None else self.cache.length * rows

    def kv_bytes(self) -> int:
        cache = self.cache
        return 0 if cache is None else cache.nbytes()

    def prefill(self, prompts: list[list[int]], every_position: bool = False):
        """Left-padded forward pass over new prompts in a cache of their own. Returns the logits (the last
        position's, or every position's) and the new rows' (cache, mask), which `join` adds to the batch."""
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - lengths[i]:] = torch.tensor(p)
            mask[i, width - lengths[i]:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = BatchCache(self.num_layers)
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=positions.to(self.device), past_key_values=cache, use_cache=True,
                         logits_to_keep=0 if every_position else 1)
        return out.logits, (cache, mask.to(self.device))

    def extend(self, pasts: list[torch.Tensor | None], chunks: list[list[int]]):
        """Prefill the next chunk of each prompt over that sequence's own KV so far (pasts: [layers, 2, heads,
        computed, dim] from the prefix cache or earlier chunks; None: nothing yet). Pasts and chunks are each
        left-padded, so a row whose chunk is short has masked holes between them. Returns the last position's
        logits [rows, vocab] and each row's KV after the chunk (live columns only)."""
        cache, past_mask = stack_rows(pasts, self.num_layers, spare=max(len(c) for c in chunks))
        width = max(len(c) for c in chunks)
        ids = torch.full((len(chunks), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunks), width), dtype=torch.long)
        pos = torch.zeros((len(chunks), width), dtype=torch.long)
        for i, (chunk, past) in enumerate(zip(chunks, pasts)):
            done = 0 if past is None else past.shape[3]
            ids[i, width - len(chunk):] = torch.tensor(chunk)
            mask[i, width - len(chunk):] = 1
            pos[i, width - len(chunk):] = torch.arange(done, done + len(chunk))
        mask = torch.cat([past_mask, mask.to(self.device)], dim=1)
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask, position_ids=pos.to(self.device),
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :], [row_kv(cache, mask, i) for i in range(len(chunks))]

    def join_rows(self, kvs: list[torch.Tensor]) -> None:
        """Add whole prefilled sequences (their KV as `extend` returns it) to the running batch."""
        self.join(stack_rows(kvs, self.num_layers, spare=64))

    def join(self, new_rows) -> None:
        cache, mask = new_rows
        self.cache, self.mask = merge(self.cache, self.mask, cache, mask)

    def decode(self, last_tokens: list[int], positions: list[int], compiled: bool = True) -> torch.Tensor:
        """One step for every running row: logits [rows, vocab] of the next token. `compiled`: the
        compiled step may run it (False: rows with adapters, which it does not model)."""
        ids = torch.tensor([[t] for t in last_tokens], device=self.device)
        pos = torch.tensor([[p] for p in positions], device=self.device)
        return self._step(self.model, self.compiled if compiled else None, ids, pos)

    def _step(self, model, compiled, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One decode step of `model` over this cache (the compiled step when it can run): a mask column
        more, keys and values written at the next column; next-token logits [rows, vocab]."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((ids.shape[0], 1))], dim=1)
        if compiled is not None and compiled.usable:
            logits = compiled.step(self, ids, pos)
            if logits is not None:
                return logits[:, -1, :]
        out = model(input_ids=ids, attention_mask=self.mask, position_ids=pos, past_key_values=self.cache,
                    use_cache=True)
        return out.logits[:, -1, :]

    def look_ahead(self, drafter, last_tokens: list[int], positions: list[int], k: int, limit: int) -> list[list[int]]:
        """k greedy tokens for every row from `drafter` (self_draft.SelfDraft: its model and compiled step,
        over this cache), each step feeding the token before; positions stop at `limit` (the context's last:
        rows that take no draft are fed along). The drafter's keys and values live only while it drafts: the
        cache and mask are rolled back after, and the draft check writes the model's own at those columns."""
        length, mask = self.cache.length, self.mask
        ids = torch.tensor([[t] for t in last_tokens], device=self.device)
        pos = torch.tensor([[p] for p in positions], device=self.device)
        tokens = []
        try:
            for step in range(k):
                ids = self._step(drafter.model, drafter.compiled, ids, (pos + step).clamp(max=limit))
                ids = ids.argmax(-1, keepdim=True)
                tokens.append(ids)
        finally:
            self.mask = mask
            self.cache.truncate(length)
        drafter.draft_steps += k
        return torch.cat(tokens, dim=1).tolist()

    def verify(self, rows: list[list[int]], positions: list[int], compiled: bool = True):
        """One step that feeds each row its last token and its draft (prompt lookup). Returns the logits
        of every fed position [fed, vocab] and where row i's position j sits in them ([rows, width]; a
        position past a row's own length points at nothing meaningful). Shorter rows are right-padded
        (masked); `settle` then keeps, per row, only the columns of the tokens it accepted. `compiled`:
        the compiled step may run it (when it was compiled for draft checks); it feeds only the real
        tokens, so a row pays for its own draft, not the widest (`packs_drafts`)."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        fed = torch.zeros((len(rows), width), dtype=self.mask.dtype)
        pos = torch.empty((len(rows), width), dtype=torch.long)
        for i, (r, p) in enumerate(zip(rows, positions)):
            ids[i, :len(r)] = torch.tensor(r)
            fed[i, :len(r)] = 1
            pos[i] = torch.arange(p, p + width).clamp(max=p + len(r) - 1)  # padding never past the context
        self.mask = torch.cat([self.mask, fed.to(self.device)], dim=1)
        if self.packs_drafts(compiled):
            live = torch.nonzero(fed.reshape(-1)).reshape(-1)
            logits = self.compiled.step(self, ids.to(self.device), pos.to(self.device), live.to(self.device))
            if logits is not None:
                where = (fed.reshape(-1).cumsum(0) - 1).clamp(min=0).view(len(rows), width)
                return logits, where.to(self.device)
        extra = {"grouped_queries": True} if self.grouped_queries else {}  # attention.py: several positions
        out = self.model(input_ids=ids.to(self.device), attention_mask=self.mask, position_ids=pos.to(self.device),
                         past_key_values=self.cache, use_cache=True, **extra)
        return out.logits.reshape(len(rows) * width, -1), torch.arange(len(rows) * width,
                                                                       device=self.device).view(len(rows), width)

    def packs_drafts(self, compiled: bool = True) -> bool:
        """Whether `verify` runs the compiled draft check, which feeds each row only its own tokens."""
        return compiled and self.compiled is not None and self.compiled.drafts_usable

    def settle(self, kept: list[int], width: int) -> None:
        """After `verify`: row i keeps the first kept[i] of the `width` columns it was fed; the cache
        shrinks to the longest row's, other rows' rejected columns stay as masked holes (compacted later)."""
        longest = max(kept)
        start = self.mask.shape[1] - width
        columns = torch.arange(width, device=self.device)[None, :] < torch.tensor(kept, device=self.device)[:, None]
        self.mask[:, start:] = columns.to(self.mask.dtype)
        self.mask = self.mask[:, :start + longest]
        self.cache.truncate(start + longest)
        self._compact()

    def _compact(self) -> None:
        """Drop masked holes once they are a quarter of the cache: each row's live columns are packed to
        the right (left padding), positions unchanged (they were applied when the keys were written)."""
        length = self.mask.shape[1]
        live = self.mask.sum(1)
        widest = int(live.max())
        if length - widest < max(_TRIM_MIN_COLUMNS, length // 4):
            return
        order = torch.argsort(self.mask, dim=1, stable=True)[:, length - widest:]  # live columns, in order, right
        self.cache.gather(order)
        self.mask = torch.gather(self.mask, 1, order)
        self.compactions += 1

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (indices into the batch); columns left holding only padding are dropped."""
        if not rows:
            self.clear()
            return
        index = torch.tensor(rows, device=self.device)
        self.cache.select(index)
        self.mask = self.mask.index_select(0, index)
        used = torch.nonzero(self.mask.sum(0) > 0)
        first = int(used[0]) if len(used) else 0
        if first >= _TRIM_MIN_COLUMNS:  # columns only padding now; stop attending over them
            self.cache.drop_front(first)
            self.mask = self.mask[:, first:]

    def clear(self) -> None:
        self.cache, self.mask = None, None
