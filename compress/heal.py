"""Healing a dropped span: one block, fitted to do what the span did.

The teacher runs once over calibration examples; hooks keep the residual stream entering the span
(x) and leaving it (y), with the keyword arguments the span's first block was called with (rotary
position embeddings, mask). A copy of one of the span's blocks is then trained alone, x -> y, with
mean squared error: a few hundred steps of one block on cached tensors, seconds to minutes on a CPU,
with no full forward pass. `fit_block` and `span_mse` are plain functions over those tensors.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch
from torch import nn

_KEEP = ("attention_mask", "position_ids", "position_embeddings", "cache_position")


@dataclass
class SpanPair:
    """One calibration example: the residual stream into and out of the span, and the call's kwargs."""

    x: torch.Tensor  # [1, T, H]
    y: torch.Tensor  # [1, T, H]
    kwargs: dict


@torch.no_grad()
def capture_span(model: nn.Module, layers: nn.ModuleList, start: int, length: int,
                 batches: list[torch.Tensor]) -> list[SpanPair]:
    """Run `model` on each unpadded batch [1, T]; keep what enters block `start` and leaves block
    `start + length - 1`."""
    got: dict = {}

    def enter(module, args, kwargs):
        got["x"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        got["kwargs"] = {k: v for k, v in kwargs.items() if k in _KEEP and v is not None}

    def leave(module, args, kwargs, output):
        got["y"] = (output[0] if isinstance(output, tuple) else output).detach().clone()

    hooks = [layers[start].register_forward_pre_hook(enter, with_kwargs=True),
             layers[start + length - 1].register_forward_hook(leave, with_kwargs=True)]
    pairs = []
    try:
        for ids in batches:
            got.clear()
            model(input_ids=ids, use_cache=False)
            pairs.append(SpanPair(got["x"], got["y"], got["kwargs"]))
    finally:
        for h in hooks:
            h.remove()
    return pairs


def _run(block: nn.Module, pair: SpanPair) -> torch.Tensor:
    out = block(pair.x, **pair.kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def span_mse(block: nn.Module | None, pairs: list[SpanPair]) -> float:
    """Mean squared error per element of `block(x)` against y over `pairs`; `block=None` is the
    identity (the span dropped with nothing in its place)."""
    total, count = 0.0, 0
    for p in pairs:
        pred = p.x if block is None else _run(block, p)
        total += float(((pred.float() - p.y.float()) ** 2).sum())
        count += p.y.numel()
    return total / max(count, 1)


def fit_block(block: nn.Module, pairs: list[SpanPair], *, steps: int, lr: float = 1e-4, per_step: int = 4,
              seed: int = 0) -> dict:
    """Train `block` in place so that block(x) ~ y (MSE), `steps` AdamW steps of `per_step` examples
    each (gradients accumulated: examples differ in length). Returns the loss curve and the time."""
    block.train()
    for p in block.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(block.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    order: list[int] = []
    losses: list[float] = []
    started = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(per_step):
            if not order:
                order = list(range(len(pairs)))
                rng.shuffle(order)
            pair = pairs[order.pop()]
            loss = torch.nn.functional.mse_loss(_run(block, pair).float(), pair.y.float()) / per_step
            loss.backward()
            step_loss += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(block.parameters(), 1.0)
        optimizer.step()
        losses.append(step_loss)
    block.eval()
    return {"steps": steps, "lr": lr, "examples_per_step": per_step,
            "seconds": round(time.perf_counter() - started, 1),
            "train_mse": {"first": round(losses[0], 6) if losses else None,
                          "last": round(sum(losses[-10:]) / max(len(losses[-10:]), 1), 6) if losses else None}}
