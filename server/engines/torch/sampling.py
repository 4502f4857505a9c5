"""Choosing the next token for every row of a batch, each row with its own sampling parameters.

Pure tensor functions: greedy rows take the argmax; sampled rows go through penalties,
temperature, top-k and top-p; a row with a seed draws from its own generator, so a seeded request
replays the same way whatever else shares its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engines.base import SamplingParams


@dataclass
class RowState:
    params: SamplingParams
    generator: torch.Generator | None
    output_ids: list[int]
    prompt_ids: list[int]
    matcher: object | None = None  # xgrammar GrammarMatcher of a constrained row (engines/guided.py)


@dataclass
class Picked:
    tokens: list[int]
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]


def apply_penalties(logits: torch.Tensor, rows: list[RowState]) -> torch.Tensor:
    """OpenAI presence/frequency penalties over generated tokens; repetition penalty over all seen."""
    for i, row in enumerate(rows):
        p = row.params
        if p.presence_penalty == 0 and p.frequency_penalty == 0 and p.repetition_penalty == 1.0:
            continue
        if row.output_ids and (p.presence_penalty or p.frequency_penalty):
            ids = torch.tensor(row.output_ids, device=logits.device)
            counts = torch.bincount(ids, minlength=logits.shape[-1])[: logits.shape[-1]].to(logits.dtype)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(row.prompt_ids) | set(row.output_ids)), device=logits.device)
            vals = logits[i, seen]
            logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    return logits


def apply_logit_bias(logits: torch.Tensor, rows: list[RowState]) -> None:
    """OpenAI's logit_bias: a value added to chosen tokens' logits (ids beyond the vocabulary ignored)."""
    vocab = logits.shape[-1]
    for i, row in enumerate(rows):
        bias = row.params.logit_bias
        if bias:
            ids = [t for t in bias if t < vocab]
            logits[i, ids] += torch.tensor([bias[t] for t in ids], dtype=logits.dtype, device=logits.device)


def apply_grammars(logits: torch.Tensor, rows: list[RowState]) -> None:
    """Mask every token a constrained row's grammar does not allow next (rows without one untouched)."""
    guided = [i for i, row in enumerate(rows) if row.matcher is not None]
    if not guided:
        return
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(len(rows), logits.shape[-1])
    for i in guided:
        rows[i].matcher.fill_next_token_bitmask(bitmask, i)
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=guided)


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask logits outside each row's top-k and nucleus (top-p). top_k <= 0 means no limit."""
    vocab = logits.shape[-1]
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    k = torch.where(top_k <= 0, torch.full_like(top_k, vocab), top_k.clamp(max=vocab))
    ranks = torch.arange(vocab, device=logits.device).expand_as(sorted_logits)
    drop = ranks >= k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass of better tokens
    drop |= before > top_p[:, None]
    drop[:, 0] = False  # always keep the best token
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def filter_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the row's best (vLLM's min_p); rows with
    min_p 0 are unchanged. Returns renormalised probabilities."""
    on = min_p > 0
    if not bool(on.any()):
        return probs
    best = probs.max(dim=-1, keepdim=True).values
    kept = probs.masked_fill(probs < min_p[:, None] * best, 0.0)
    kept = kept / kept.sum(dim=-1, keepdim=True)
    return torch.where(on[:, None], kept, probs)  # other rows untouched, bit for bit, whoever shares the batch


def score_prompt(logits: torch.Tensor, prompt_ids: list[int], k: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """Logprob of each prompt token after the first, from the logits at the position before it
    ([len(prompt), vocab]), with the top k at that position: (logprob, [(token id, logprob)])."""
    logp = torch.log_softmax(logits[:-1].float(), dim=-1)
    targets = torch.tensor(prompt_ids[1:], device=logp.device)
    chosen = logp.gather(1, targets[:, None])[:, 0].tolist()
    if k <= 0:
        return [(c, []) for c in chosen]
    vals, ids = torch.topk(logp, k, dim=-1)
    return [(c, list(zip(i, v))) for c, i, v in zip(chosen, ids.tolist(), vals.tolist())]


def pick_tokens(logits: torch.Tensor, rows: list[RowState], shared: torch.Generator) -> Picked:
    """Choose one token per row from float32 logits [batch, vocab]."""
    raw = logits
    want_logprobs = any(r.params.logprobs is not None for r in rows)
    logits = apply_penalties(logits.clone(), rows)
    apply_logit_bias(logits, rows)
    apply_grammars(logits, rows)
    tokens = torch.argmax(logits, dim=-1)
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if sampled:
        idx = torch.tensor(sampled, device=logits.device)
        sub = logits.index_select(0, idx)
        temps = torch.tensor([rows[i].params.temperature for i in sampled], device=logits.device)
        sub = sub / temps[:, None]
        top_k = torch.tensor([rows[i].params.top_k for i in sampled], device=logits.device)
        top_p = torch.tensor([rows[i].params.top_p for i in sampled], device=logits.device, dtype=sub.dtype)
        probs = torch.softmax(filter_top_k_top_p(sub, top_k, top_p), dim=-1)
        min_p = torch.tensor([rows[i].params.min_p for i in sampled], device=logits.device, dtype=probs.dtype)
        probs = filter_min_p(probs, min_p)
        for j, i in enumerate(sampled):
            gen = rows[i].generator or shared
            tokens[i] = torch.multinomial(probs[j], 1, generator=gen)[0]
    token_list = tokens.tolist()
    logprobs: list = [None] * len(rows)
    if want_logprobs:
        logp = torch.log_softmax(raw, dim=-1)
        for i, row in enumerate(rows):
            k = row.params.logprobs
            if k is None:
                continue
            top: list[tuple[int, float]] = []
            if k > 0:
                vals, ids = torch.topk(logp[i], k)
                top = list(zip(ids.tolist(), vals.tolist()))
            logprobs[i] = (float(logp[i, token_list[i]]), top)
    return Picked(token_list, logprobs)
