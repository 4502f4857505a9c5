"""The distillation loss math, called directly."""

from __future__ import annotations

import math

import pytest
import torch

from compress.distill_losses import (distill_loss, forward_kl, generalized_jsd, reverse_kl, tail_logmass,
                                     topk_distill_loss, topk_forward_kl)


@pytest.fixture()
def logits():
    torch.manual_seed(0)
    return torch.randn(6, 11), torch.randn(6, 11)


@pytest.mark.parametrize("fn", [forward_kl, reverse_kl, generalized_jsd])
def test_identical_distributions_give_zero(fn, logits):
    s, _ = logits
    assert abs(float(fn(s, s.clone()))) < 1e-6


def test_hand_computed_case():
    teacher = torch.log(torch.tensor([[0.5, 0.5]]))
    student = torch.log(torch.tensor([[0.25, 0.75]]))
    expected_forward = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    expected_reverse = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert abs(float(forward_kl(student, teacher)) - expected_forward) < 1e-6
    assert abs(float(reverse_kl(student, teacher)) - expected_reverse) < 1e-6
    m = [0.375, 0.625]  # beta = 0.5
    expected_jsd = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) + \
        0.5 * (0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1]))
    assert abs(float(generalized_jsd(student, teacher, beta=0.5)) - expected_jsd) < 1e-6


def test_temperature_scaling_keeps_the_loss_size(logits):
    # for small logits KL is quadratic in them, so dividing by T shrinks it by T^2; the T^2 factor
    # restores it: the scaled loss barely depends on T there
    s, t = (x * 1e-2 for x in logits)
    one, four = float(forward_kl(s, t, temperature=1.0)), float(forward_kl(s, t, temperature=4.0))
    assert one > 0 and abs(four / one - 1) < 0.05


def test_gradients_reach_the_student_only(logits):
    s, t = logits
    s = s.clone().requires_grad_(True)
    t = t.clone().requires_grad_(True)
    labels = torch.tensor([1, 2, -100, 3, 4, 5])
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        s.grad = t.grad = None
        distill_loss(s, t, labels, kind=kind, alpha=0.5, temperature=2.0).backward()
        assert s.grad is not None and s.grad.abs().sum() > 0
        assert t.grad is None


def test_alpha_mixes_with_cross_entropy(logits):
    s, t = logits
    labels = torch.tensor([1, 2, 3, 4, 5, 6])
    ce = torch.nn.functional.cross_entropy(s, labels)
    assert torch.allclose(distill_loss(s, t, labels, alpha=0.0), ce)
    assert torch.allclose(distill_loss(s, t, labels, alpha=1.0), forward_kl(s, t))


def _topk(teacher: torch.Tensor, k: int):
    """As the cache stores them: ids int32, log-probs float16, the tail's log-mass float32."""
    top = torch.log_softmax(teacher, -1).topk(k, dim=-1)
    return top.indices.int(), top.values.half(), tail_logmass(teacher, top.indices)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_kl_equals_forward_kl_when_k_is_the_vocab(logits, temperature):
    s, t = logits
    ids, lp, tail = _topk(t, t.shape[-1])
    full = float(forward_kl(s, t, temperature))
    assert abs(float(topk_forward_kl(s, ids, lp, tail, temperature)) - full) < 1e-2 * full  # float16 log-probs


@pytest.mark.parametrize("k", [1, 4, 11])
def test_topk_kl_is_zero_for_identical_distributions_and_below_the_full_kl(logits, k):
    s, t = logits
    ids, lp, tail = _topk(t, k)
    assert abs(float(topk_forward_kl(t.clone(), ids, lp, tail, 2.0))) < 1e-3
    # k + 1 outcomes are a coarser view of the same two distributions: never more divergent
    assert 0 < float(topk_forward_kl(s, ids, lp, tail)) <= float(forward_kl(s, t)) + 1e-3


def test_topk_kl_sees_the_tail_mass(logits):
    _, t = logits
    ids, lp, tail = _topk(t, 4)
    # the same shape on the top 4 tokens, but far more mass on the others: penalised
    heavier_tail = t.clone().scatter_add(-1, ids.long(), torch.full((t.shape[0], 4), -3.0))
    assert float(topk_forward_kl(heavier_tail, ids, lp, tail)) > 0.1


def test_topk_loss_masks_mixes_and_reaches_the_student_only(logits):
    s, t = logits
    s = s.clone().requires_grad_(True)
    ids, lp, tail = _topk(t, 5)
    lp.requires_grad_(True)
    labels = torch.tensor([1, 2, -100, 3, 4, 5])
    loss = topk_distill_loss(s, ids, lp, tail, labels, alpha=0.5, temperature=2.0)
    loss.backward()
    assert s.grad[2].abs().sum() == 0 and s.grad[0].abs().sum() > 0  # the ignored position gives no gradient
    assert lp.grad is None
    ce = torch.nn.functional.cross_entropy(s.detach(), labels, ignore_index=-100)
    assert torch.allclose(topk_distill_loss(s.detach(), ids, lp, tail, labels, alpha=0.0), ce)
