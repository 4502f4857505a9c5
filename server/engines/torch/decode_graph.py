"""One decode step of a Llama-family model as a plain function of tensors, for torch.compile.

transformers' forward is a tree of ~500 module calls a step, cache objects and mask builders: fine
for eager, opaque to a compiler. `DecodeGraph` walks the same layers with the same arithmetic (the
RMSNorm, rotary, grouped attention and MLP of Llama, Mistral and Qwen2) over explicit tensors: the
new tokens and positions, the 0/1 mask, each layer's key/value buffers (written at `column` in place)
and returns the next-token logits. Linears go through `linear_op` (opaque to the compiler, the layer's
own kernel). Anything else (another architecture, a rotary that changes with length, sliding windows,
sdpa attention) is refused with the reason, and the engine decodes eagerly.
"""

from __future__ import annotations

import torch
from torch import nn

from server.engines.torch import decode_attention, linear_op
from server.engines.torch.attention import NAME as GROUPED, allowed_columns
from server.engines.torch.fused_projections import SharedProjection
from server.engines.torch.lora import LoRALinear

ARCHITECTURES = ("llama", "mistral", "qwen2")
_ROPE_TYPES = ("default", "linear", "llama3")  # inv_freq fixed at load ("dynamic", "longrope" change with length)
_FLOOR = torch.finfo(torch.float32).min  # as attention.py: a padding row stays finite


def unsupported(model: nn.Module) -> str | None:
    """Why this model's decode step cannot be written here, or None."""
    config = model.config
    if config.model_type not in ARCHITECTURES:
        return f"architecture {config.model_type!r} (compiled decode covers {', '.join(ARCHITECTURES)})"
    if getattr(config, "_attn_implementation", None) != GROUPED:
        return "needs the grouped decode attention (grouped_attention on, a CPU device)"
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope not in _ROPE_TYPES:
        return f"rotary type {rope!r} changes with the sequence length"
    layer_types = getattr(config, "layer_types", None) or []
    window = getattr(config, "sliding_window", None)
    if any(t != "full_attention" for t in layer_types) or (
            window and getattr(config, "use_sliding_window", True) and layer_types == []):
        return "sliding-window attention"
    for layer in model.model.layers:
        if not all(hasattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) or not all(
                hasattr(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            return f"decoder layer {type(layer).__name__} is not Llama-shaped"
    return None


def _base(module: nn.Module) -> nn.Module:
    return module.base if isinstance(module, LoRALinear) else module  # LoRA rows decode eagerly


class _Projections:
    """Linears that read the same input: one slot split in sizes when they are a fused group, else one each."""

    def __init__(self, modules: list[nn.Module], slots: list[int]):
        members = [_base(m) for m in modules]
        groups = {id(m._group[0]) for m in members if isinstance(m, SharedProjection)}
        if len(groups) == 1 and all(isinstance(m, SharedProjection) for m in members) and \
                [m.index for m in members] == list(range(len(members))):
            group = members[0]._group[0]
            self.slots, self.sizes = [linear_op.register(group.layer)], list(group.sizes)
        else:
            self.slots, self.sizes = [linear_op.register(m) for m in members], None
        slots.extend(self.slots)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.sizes is not None:
            return list(linear_op.linear(x, self.slots[0]).split(self.sizes, dim=-1))
        return [linear_op.linear(x, s) for s in self.slots]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DecodeGraph:
    def __init__(self, model: nn.Module):
        reason = unsupported(model)
        if reason:
            raise ValueError(reason)
        self.model = model
        self.slots: list[int] = []
        self.attn = [_Projections([l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj], self.slots)
                     for l in model.model.layers]
        self.out = [linear_op.register(_base(l.self_attn.o_proj)) for l in model.model.layers]
        self.gate_up = [_Projections([l.mlp.gate_proj, l.mlp.up_proj], self.slots) for l in model.model.layers]
        self.down = [linear_op.register(_base(l.mlp.down_proj)) for l in model.model.layers]
        self.head = linear_op.register(_base(model.lm_head))
        self.slots += self.out + self.down + [self.head]
        self.own_attention = decode_attention.off_reason() is None  # else the matmul path (_attention)

    def release(self) -> None:
        linear_op.release(self.slots)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, keys: list[torch.Tensor],
                 values: list[torch.Tensor], column: torch.Tensor, live: torch.Tensor | None = None) -> torch.Tensor:
        """ids, positions [b, w] (w = 1: a decode step; w > 1: prompt lookup's draft check, each row's last
        token and draft); mask [b, length] bool, the w new columns included; keys/values per layer
        [b, kv_heads, capacity >= length, dim], written at `column` ([w]: length - w .. length - 1).
        -> logits [b, w, vocab]. `live` (a draft check whose rows differ in width): the flat indices
        (row * w + position) of the tokens really fed; only those go through the linears (a shorter row's
        padding is neither multiplied nor attended from) and the logits are theirs, [len(live), vocab]."""
        inner = self.model.model
        b, w, length = ids.shape[0], ids.shape[1], mask.shape[-1]
        if live is None:
            h = inner.embed_tokens(ids)
            cos, sin = inner.rotary_emb(h, positions)
            cos, sin = cos[:, None], sin[:, None]  # [b, 1, w, dim]
        else:  # packed: the rows' tokens one after another, [n, hidden]
            h = inner.embed_tokens(ids.reshape(-1)[live])
            cos, sin = inner.rotary_emb(h, positions.reshape(-1)[live][None])
            cos, sin = cos[0][:, None], sin[0][:, None]  # [n, 1, dim]
        allowed = None if self.own_attention else allowed_columns(mask, w)
        for i, layer in enumerate(inner.layers):
            attn = layer.self_attn
            q, k, v = self.attn[i](layer.input_layernorm(h))
            q, k, v = (self._heads(x, attn.head_dim, b, w, live) for x in (q, k, v))
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            if live is not None:
                q, k, v = (self._unpack(x, live, b, w) for x in (q, k, v))
            keys[i].index_copy_(2, column, k)
            values[i].index_copy_(2, column, v)
            k, v = keys[i][:, :, :length], values[i][:, :, :length]
            if self.own_attention:
                attended = decode_attention.op(q, k, v, mask, attn.scaling, live is not None)
            else:
                attended = self._attention(q, k, v, allowed, attn.scaling)
            if live is not None:
                attended = attended.reshape(b * w, -1).index_select(0, live)
            h = h + linear_op.linear(attended, self.out[i])
            gate, up = self.gate_up[i](layer.post_attention_layernorm(h))
            h = h + linear_op.linear(layer.mlp.act_fn(gate) * up, self.down[i])
        return linear_op.linear(inner.norm(h), self.head)

    @staticmethod
    def _heads(x: torch.Tensor, dim: int, b: int, w: int, live: torch.Tensor | None) -> torch.Tensor:
        """A projection's output split in heads: [b, heads, w, dim], or packed [n, heads, dim]."""
        if live is not None:
            return x.view(x.shape[0], -1, dim)
        return x.view(b, w, -1, dim).transpose(1, 2)

    @staticmethod
    def _unpack(x: torch.Tensor, live: torch.Tensor, b: int, w: int) -> torch.Tensor:
        """Packed [n, heads, dim] -> [b, heads, w, dim], zeros where a row fed nothing."""
        padded = x.new_zeros((b * w, x.shape[1], x.shape[2])).index_copy(0, live, x)
        return padded.view(b, w, x.shape[1], x.shape[2]).transpose(1, 2)

    @staticmethod
    def _attention(q, k, v, allowed, scale) -> torch.Tensor:
        """attention.grouped_attention's arithmetic: q [b, heads, w, dim] -> [b, w, heads * dim]."""
        b, heads, w, dim = q.shape
        kv_heads, length = k.shape[1], k.shape[2]
        groups = heads // kv_heads
        scores = torch.matmul(q.float().reshape(b, kv_heads, groups * w, dim), k.float().transpose(-1, -2))
        scores = (scores.view(b, kv_heads, groups, w, length) * scale).masked_fill(~allowed, _FLOOR)
        probs = torch.softmax(scores, dim=-1).view(b, kv_heads, groups * w, length)
        out = torch.matmul(probs, v.float()).view(b, heads, w, v.shape[-1])
        return out.to(q.dtype).transpose(1, 2).reshape(b, w, heads * v.shape[-1])
