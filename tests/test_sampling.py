"""The sampling math, called directly."""

from __future__ import annotations

import torch

from server.engines.base import SamplingParams
from server.engines.torch.sampling import RowState, filter_top_k_top_p, pick_tokens


def _row(**kw) -> RowState:
    seed = kw.pop("seed", None)
    gen = None
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
    return RowState(SamplingParams(max_tokens=4, seed=seed, **kw), gen, [], [1, 2])


def test_top_k_keeps_k_best():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    out = filter_top_k_top_p(logits, torch.tensor([2]), torch.tensor([1.0]))
    assert torch.isfinite(out).tolist() == [[False, True, True, False]]


def test_top_p_keeps_the_nucleus_and_at_least_one():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = filter_top_k_top_p(probs.log(), torch.tensor([-1]), torch.tensor([0.7]))
    assert torch.isfinite(out).tolist() == [[True, True, False, False]]
    out = filter_top_k_top_p(probs.log(), torch.tensor([-1]), torch.tensor([0.01]))
    assert torch.isfinite(out).tolist() == [[True, False, False, False]]


def test_greedy_rows_take_argmax_and_seeded_rows_replay():
    logits = torch.randn(3, 50)
    shared = torch.Generator().manual_seed(0)
    rows = [_row(temperature=0.0), _row(temperature=1.0, seed=5), _row(temperature=1.0, seed=5)]
    picked = pick_tokens(logits.clone(), rows, shared)
    assert picked.tokens[0] == int(logits[0].argmax())
    again = pick_tokens(logits[1:2].clone(), [_row(temperature=1.0, seed=5)], shared)
    assert again.tokens[0] == picked.tokens[1]


def test_seeded_row_independent_of_batch_neighbours():
    torch.manual_seed(0)
    row_logits = torch.randn(1, 100)
    alone = [pick_tokens(row_logits.clone(), [_row(temperature=1.0, seed=9)], torch.Generator()).tokens[0]
             for _ in range(1)]
    batch = torch.cat([torch.randn(3, 100), row_logits])
    rows = [_row(temperature=1.0), _row(temperature=0.7), _row(temperature=0.0), _row(temperature=1.0, seed=9)]
    assert pick_tokens(batch, rows, torch.Generator()).tokens[3] == alone[0]


def test_logprobs_are_of_the_raw_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    picked = pick_tokens(logits.clone(), [_row(temperature=0.0, logprobs=2)], torch.Generator())
    value, top = picked.logprobs[0]
    expected = torch.log_softmax(logits, -1)[0]
    assert abs(value - float(expected[0])) < 1e-6
    assert [t for t, _ in top] == [0, 1]


def test_frequency_penalty_changes_the_choice():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    row = _row(temperature=0.0, frequency_penalty=1.0)
    row.output_ids.extend([0])
    assert pick_tokens(logits.clone(), [row], torch.Generator()).tokens[0] == 1


def test_min_p_leaves_the_other_rows_bit_for_bit():
    """A row without min_p gets the same probabilities whether or not a min_p row shares its batch (so a
    seeded row samples the same whoever it is batched with, speculation's checks included)."""
    from server.engines.torch.sampling import filter_min_p

    probs = torch.softmax(torch.randn(3, 500, generator=torch.Generator().manual_seed(1)) * 3, dim=-1)
    alone = filter_min_p(probs[:2], torch.tensor([0.0, 0.0]))
    mixed = filter_min_p(probs, torch.tensor([0.0, 0.0, 0.2]))
    assert torch.equal(mixed[:2], alone) and torch.equal(alone, probs[:2])
    assert (mixed[2] == 0).sum() > 0 and torch.isclose(mixed[2].sum(), torch.tensor(1.0))
