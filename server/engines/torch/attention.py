"""Attention for decode steps on a CPU: one query position per row over a long KV cache.

transformers' "sdpa" path copies every key and value head `num_key_value_groups` times (repeat_kv) before
torch's fused kernel whenever there is a mask, and our batches always carry one (left padding). On a
CPU that fused kernel is slow at one query row, so at 16 rows half of a SmolLM2 decode step was those
copies plus that kernel (py-spy over a c=16 bench). Here the query heads of a group share their
key/value head through a reshape and two batched matmuls in fp32 (the precision the fused kernel keeps
inside), measured 5-6x faster per layer at 16 rows x 200 columns and ~2x at one row
(tests/bench/attention_step.py). Where slimserve's own kernel runs (decode_attention.py: each cached key
and value read once, converted in registers, no fp32 copies of the cache) and the mask is a bool one,
that kernel does the same arithmetic instead. Prompt lookup's draft check (a few positions per row) runs here too,
asked for by the runner. Prefill, a chunk over cached KV, and anything this does not model (dropout,
soft-capping, sinks) go to transformers' own sdpa function: a prompt prefilled whole or as a chunk
over its cached prefix then gets the same numbers as before, so prefix caching and chunking keep bf16
outputs unchanged.

fp32 models give the same greedy tokens as sdpa. In bf16 the sums run in another order than the fused
kernel's blocks, so a near-tie can flip a greedy token (as between transformers' eager and sdpa); the
KL to the fp32 model is the same as sdpa's (tests/test_grouped_attention.py).
"""

from __future__ import annotations

import torch

from server.engines.torch import decode_attention

NAME = "slimserve_grouped"
MAX_QUERIES = 16  # the most query positions a draft check runs here (its scores are [b, heads, q, k] in fp32)
_UNMODELLED = ("softcap", "s_aux", "sinks", "position_bias", "cache")
_FLOOR = torch.finfo(torch.float32).min


def grouped_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      grouped_queries: bool = False, **kwargs) -> tuple[torch.Tensor, None]:
    """query [b, heads, q, dim], key/value [b, kv_heads, k, dim], mask [b, 1, q, k] (bool: attend, or additive)
    or None. Runs for one query position, or for several when the caller passes `grouped_queries=True` (the
    draft check: a few positions, always with a mask). Returns ([b, q, heads, dim], None) as transformers'
    attention functions do."""
    b, heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    several = grouped_queries and attention_mask is not None and q_len <= MAX_QUERIES
    if (q_len != 1 and not several) or dropout or heads % kv_heads or any(kwargs.get(k) is not None
                                                                          for k in _UNMODELLED):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = heads // kv_heads
    scale = dim ** -0.5 if scaling is None else scaling
    padding = _padding_mask(attention_mask, b, q_len, k_len)
    if padding is not None and query.dtype in (torch.bfloat16, torch.float32) and query.device.type == "cpu" \
            and key.shape[-1] == value.shape[-1] == dim and _own_kernel():
        out = decode_attention.attend(query, key.to(query.dtype), value.to(query.dtype), padding, scale)
        return out.view(b, q_len, heads, dim), None
    q = query.float().reshape(b, kv_heads, groups * q_len, dim)  # the heads of a group share their kv head
    scores = torch.matmul(q, key.float().transpose(-1, -2)).view(b, kv_heads, groups, q_len, k_len)
    scores.mul_(scale)
    if attention_mask is not None:  # a finite floor, not -inf: a row with nothing to attend to (a padding
        # query) gets a finite average, not NaN that the next layer's keys would spread to every row
        mask = attention_mask[:, :, None, -q_len:, -k_len:]  # [b, 1, 1, q, k]: the same for every head
        if mask.dtype == torch.bool:
            scores.masked_fill_(~mask, _FLOOR)
        else:
            scores.add_(mask.float()).clamp_(min=_FLOOR)
    probs = torch.softmax(scores, dim=-1).view(b, kv_heads, groups * q_len, k_len)
    out = torch.matmul(probs, value.float()).view(b, heads, q_len, value.shape[-1])
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _padding_mask(mask: torch.Tensor | None, rows: int, q_len: int, k_len: int) -> torch.Tensor | None:
    """The [rows, k_len] 0/1 mask the kernel takes: the last query's row of a bool 4-D mask, all ones without
    a mask. The kernel rebuilds a draft check's earlier rows as that row cut causally; a mask whose rows are
    not (a sliding window, chunked attention) and an additive mask return None: the matmuls model them."""
    if mask is None:
        return torch.ones((rows, k_len), dtype=torch.bool)
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
        return None
    last = mask[:, 0, -1, -k_len:].expand(rows, k_len)
    if q_len > 1 and not torch.equal(mask[:, 0, -q_len:, -k_len:].expand(rows, q_len, k_len),
                                     allowed_columns(last, q_len)[:, 0, 0]):
        return None
    return last


def allowed_columns(mask: torch.Tensor, w: int) -> torch.Tensor:
    """[b, 1, 1, w, length] bool: the [b, length] 0/1 mask, causal inside the w new columns (query j sees
    the columns up to its own, length - w + j), as the kernel and the compiled step's matmuls apply it;
    the same for every head of a group."""
    length = mask.shape[-1]
    allowed = mask[:, None, :]
    if w > 1:
        last = length - w + torch.arange(w, device=mask.device)
        allowed = allowed & (torch.arange(length, device=mask.device)[None, None, :] <= last[None, :, None])
    return allowed[:, None, None]


def _own_kernel() -> bool:
    return decode_attention.off_reason() is None


def use_grouped_attention(model) -> bool:
    """Point a CPU model that runs transformers' sdpa attention at `grouped_attention`; False where it
    runs another implementation (eager, flex, a remote-code model's own), which is left as it is."""
    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, grouped_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # the same 4-D mask sdpa gets
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, ImportError):  # a model class that refuses custom attention
        return False
    return config._attn_implementation == NAME
