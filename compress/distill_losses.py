"""Knowledge-distillation losses as pure functions over logits [tokens, vocab].

forward KL  KL(teacher || student) at temperature T, scaled by T^2 (Hinton et al.) so gradients
            keep their size as T changes; the student covers all of the teacher's modes.
reverse KL  KL(student || teacher): mode-seeking (MiniLLM).
JSD(beta)   generalised Jensen-Shannon: beta*KL(t||m) + (1-beta)*KL(s||m), m = beta*t + (1-beta)*s
            (GKD, Agarwal et al.); beta -> 0 approaches forward KL's behaviour, 1 reverse's.
top-k KL    forward KL against a teacher cached as its top-k tokens per position (teacher_cache.py):
            the teacher is truncated to those k tokens and renormalised, the student keeps its full
            log-softmax and is read on the k ids. This is exactly KL(p_k || q) with p_k the truncated
            teacher (zero outside its top k), so it is >= 0, zero only when the student puts the same
            mass on those k tokens and none elsewhere, and equal to the full forward KL when k = vocab.
            The approximation: the teacher's tail (1 - its top-k mass, recorded in the cache manifest)
            is dropped, so the target is a little sharper than the teacher.
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


def topk_forward_kl(student: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                    temperature: float = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """student [tokens, vocab] logits; teacher_ids / teacher_logprobs [tokens, k]: the teacher's top k
    (log-probabilities at T=1; tempering them and renormalising over k equals tempering the logits)."""
    t = F.log_softmax(teacher_logprobs.detach().float() / temperature, dim=-1)  # renormalised over its top k
    s = F.log_softmax(student.float() / temperature, dim=-1).gather(-1, teacher_ids.long())
    per_token = (t.exp() * (t - s)).sum(-1)
    return _masked_mean(per_token, mask) * temperature**2


def topk_distill_loss(student: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                      labels: torch.Tensor, *, alpha: float = 1.0, temperature: float = 1.0) -> torch.Tensor:
    """alpha * top-k KL + (1 - alpha) * CE, as distill_loss for a cached teacher."""
    kd = topk_forward_kl(student, teacher_ids, teacher_logprobs, temperature, labels != IGNORE)
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
