"""The contiguous span of decoder blocks that changes the hidden state least.

Gromov et al. 2024 ("The Unreasonable Ineffectiveness of the Deeper Layers"): for a span of n blocks
starting at s, the angular distance d(s, n) = arccos(cos(x_s, x_{s+n})) / pi between the residual
stream entering block s and leaving block s+n-1, averaged over tokens. The span with the smallest
d changes the representation least as a whole, and is the one to drop (and heal: compress.heal).
Unlike per-block influence (compress.prune), this scores the span's joint effect: two blocks can each
do a lot and undo each other.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def angular_distance(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean over tokens of arccos(cos(x, y)) / pi, in [0, 1] (pure)."""
    cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1).clamp(-1.0, 1.0)
    angle = torch.arccos(cos) / math.pi
    if mask is not None:
        return float((angle * mask).sum() / mask.sum())
    return float(angle.mean())


def span_distances(states: list[torch.Tensor], length: int) -> list[float]:
    """d(s, length) for every start s, from the residual stream before each block and after the last:
    `states[i]` enters block i, `states[-1]` leaves the last block (len(states) = blocks + 1). Pure."""
    blocks = len(states) - 1
    if not 0 < length < blocks:
        raise ValueError(f"a span must hold between 1 and {blocks - 1} of the {blocks} blocks, not {length}")
    return [angular_distance(states[s], states[s + length]) for s in range(blocks - length + 1)]


def choose_span(distances: list[float], protect_last: bool = True) -> int:
    """The start of the span with the smallest distance. With `protect_last`, spans that end at the
    final block are skipped when another exists (the last block maps to the vocabulary; Gromov et al.
    keep it)."""
    candidates = list(range(len(distances)))
    if protect_last and len(candidates) > 1:
        candidates = candidates[:-1]
    return min(candidates, key=lambda s: (distances[s], s))


@torch.no_grad()
def residual_states(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor) -> list[torch.Tensor]:
    """The residual stream entering each block, and leaving the last one (before the final norm), for
    one unpadded batch `ids`."""
    states: list[torch.Tensor] = [None] * (len(layers) + 1)
    hooks = []

    def capture(index):
        def hook(module, args, kwargs, output):
            states[index] = (args[0] if args else kwargs["hidden_states"]).detach()
            if index == len(layers) - 1:
                states[index + 1] = (output[0] if isinstance(output, tuple) else output).detach()
        return hook

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(capture(i), with_kwargs=True))
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return states


def score_spans(model: nn.Module, layers: nn.ModuleList, batches: list[torch.Tensor], length: int) -> list[float]:
    """d(s, length) for every start s, averaged over calibration batches (each [1, T], unpadded)."""
    totals: list[float] | None = None
    for ids in batches:
        d = span_distances(residual_states(model, layers, ids), length)
        totals = d if totals is None else [a + b for a, b in zip(totals, d)]
    if totals is None:
        raise ValueError("no calibration batch to score spans on")
    return [t / len(batches) for t in totals]
