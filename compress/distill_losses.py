"""Knowledge-distillation losses as pure functions over logits [tokens, vocab].

forward KL  KL(teacher || student) at temperature T, scaled by T^2 (Hinton et al.) so gradients
            keep their size as T changes; the student covers all of the teacher's modes.
reverse KL  KL(student || teacher): mode-seeking (MiniLLM).
JSD(beta)   generalised Jensen-Shannon: beta*KL(t||m) + (1-beta)*KL(s||m), m = beta*t + (1-beta)*s
            (GKD, Agarwal et al.); beta -> 0 approaches forward KL's behaviour, 1 reverse's.
top-k KL    forward KL against a teacher cached as its top-k tokens per position (teacher_cache.py),
            over k + 1 outcomes: each of the teacher's top k tokens, and "any other token" carrying
            the rest of the mass (the teacher's tail is stored with the cache; the student's is its
            log-softmax summed outside those ids). Both coarse distributions are tempered alike.
            By the data-processing inequality it is <= the full forward KL; it is 0 for identical
            distributions at any k and equals the full forward KL when k = vocab. The approximation:
            how the mass is spread inside the tail is not seen. (Renormalising the teacher over its
            top k instead, with the student read on those ids, was tried first: at T=2 the student's
            tempered mass spreads over the whole vocabulary, so that target pushed all of it into k
            tokens; on SmolLM2 it raised held-out perplexity 199 -> 373 where on-the-fly KD gave 151.)
Each mixes with cross-entropy on the labels: alpha * KD + (1 - alpha) * CE.
The teacher's logits are detached: gradients reach the student only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def _masked_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def _log_probs(student: torch.Tensor, teacher: torch.Tensor, temperature: float):
    """Tempered log-probabilities (student, teacher); the teacher is detached."""
    return (F.log_softmax(student.float() / temperature, dim=-1),
            F.log_softmax(teacher.detach().float() / temperature, dim=-1))


def forward_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    s, t = _log_probs(student, teacher, temperature)
    per_token = (t.exp() * (t - s)).sum(-1)
    return _masked_mean(per_token, mask) * temperature**2


def reverse_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    s, t = _log_probs(student, teacher, temperature)
    per_token = (s.exp() * (s - t)).sum(-1)
    return _masked_mean(per_token, mask) * temperature**2


def generalized_jsd(student: torch.Tensor, teacher: torch.Tensor, beta: float = 0.5, temperature: float = 1.0,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    if not 0.0 < beta < 1.0:
        raise ValueError("beta must lie strictly between 0 and 1")
    s, t = _log_probs(student, teacher, temperature)
    m = torch.logsumexp(torch.stack([t + torch.log(torch.tensor(beta)), s + torch.log(torch.tensor(1 - beta))]), 0)
    per_token = beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)
    return _masked_mean(per_token, mask) * temperature**2


LOG_ZERO = -1e4  # stands for log 0, so that 0 * (log 0 - log 0) stays 0 instead of nan


def tail_logmass(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log of the probability (T=1) that `logits` [tokens, vocab] give to tokens outside `ids` [tokens, k]."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return torch.logsumexp(logp.scatter(-1, ids.long(), float("-inf")), dim=-1).clamp(min=LOG_ZERO)


def topk_forward_kl(student: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                    teacher_tail: torch.Tensor, temperature: float = 1.0,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """student [tokens, vocab] logits; teacher_ids / teacher_logprobs [tokens, k]: the teacher's top k
    log-probabilities at T=1; teacher_tail [tokens]: log of the teacher's mass outside them."""
    t = torch.cat([teacher_logprobs.detach().float(), teacher_tail.detach().float()[:, None]], -1)
    s_logp = F.log_softmax(student.float(), dim=-1)
    s = torch.cat([s_logp.gather(-1, teacher_ids.long()), tail_logmass(student, teacher_ids)[:, None]], -1)
    t = F.log_softmax(t.clamp(min=LOG_ZERO) / temperature, dim=-1)
    s = F.log_softmax(s.clamp(min=LOG_ZERO) / temperature, dim=-1)
    per_token = (t.exp() * (t - s)).sum(-1)
    return _masked_mean(per_token, mask) * temperature**2


def topk_distill_loss(student: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                      teacher_tail: torch.Tensor, labels: torch.Tensor, *, alpha: float = 1.0,
                      temperature: float = 1.0) -> torch.Tensor:
    """alpha * top-k KL + (1 - alpha) * CE, as distill_loss for a cached teacher."""
    kd = topk_forward_kl(student, teacher_ids, teacher_logprobs, teacher_tail, temperature, labels != IGNORE)
    return kd if alpha >= 1.0 else alpha * kd + (1 - alpha) * _cross_entropy(student, labels)


def _cross_entropy(student: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(student.float().reshape(-1, student.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, *, kind: str = "forward_kl",
                 alpha: float = 1.0, temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """alpha * KD + (1 - alpha) * CE over positions whose label is not IGNORE (logits already shifted)."""
    mask = labels != IGNORE
    if kind == "forward_kl":
        kd = forward_kl(student, teacher, temperature, mask)
    elif kind == "reverse_kl":
        kd = reverse_kl(student, teacher, temperature, mask)
    elif kind == "jsd":
        kd = generalized_jsd(student, teacher, beta, temperature, mask)
    else:
        raise ValueError(f"unknown distillation loss {kind!r}")
    return kd if alpha >= 1.0 else alpha * kd + (1 - alpha) * _cross_entropy(student, labels)
