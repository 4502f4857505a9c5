"""The shared training loop on a small torch model: an interrupted and resumed run equals an
uninterrupted one, accumulation equals a larger batch, evaluation lands at the asked steps."""

from __future__ import annotations

import random

import pytest
import torch

from compress.training import LoopConfig, ResumeError, latest_checkpoint, train_loop


class Stop(Exception):
    pass


def make_model(seed: int = 0, dropout: float = 0.3):
    torch.manual_seed(seed)
    # dropout draws from torch's RNG: a resume that lost the RNG state would diverge
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(dropout), torch.nn.Linear(16, 1))


def epoch_batches(epoch: int, size: int = 4):
    g = torch.Generator().manual_seed(1000 + epoch)  # the order depends on the epoch alone
    x = torch.randn(12, 4, generator=g)
    y = x.sum(-1, keepdim=True)
    return [(x[i:i + size], y[i:i + size]) for i in range(0, 12, size)]


def run(tmp, max_steps, *, stop_at=None, resume=False, eval_every=0, save_every=0, grad_accum=1, size=4, dropout=0.3):
    model = make_model(dropout=dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / max_steps))
    calls = {"n": 0}

    def loss_fn(batch):
        calls["n"] += 1
        if stop_at is not None and calls["n"] > stop_at * grad_accum:
            raise Stop()
        x, y = batch
        random.random()  # python's RNG is part of the checkpoint too
        return torch.nn.functional.mse_loss(model(x), y), len(x)

    def evaluate():
        with torch.no_grad():
            x, y = epoch_batches(99)[0]
            return {"loss": torch.nn.functional.mse_loss(model.eval()(x), y)}

    cfg = LoopConfig(max_steps=max_steps, out=tmp, grad_accum=grad_accum, eval_every=eval_every,
                     save_every=save_every, resume=resume, progress=False, fingerprint={"lr": 1e-2})
    result = train_loop(model, lambda e: epoch_batches(e, size), loss_fn, cfg, optimizer=opt, scheduler=sched,
                        evaluate=evaluate)
    return model, result


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    torch.manual_seed(5)
    random.seed(5)
    whole, ref = run(tmp_path / "whole", 10, eval_every=5)
    torch.manual_seed(5)
    random.seed(5)
    with pytest.raises(Stop):  # killed at step 7; the newest checkpoint is step 5
        run(tmp_path / "cut", 10, stop_at=7, save_every=5, eval_every=5)
    assert latest_checkpoint(tmp_path / "cut").name == "step-5"
    torch.manual_seed(123)  # a fresh process: different RNG state until the checkpoint restores it
    random.seed(123)
    resumed, res = run(tmp_path / "cut", 10, resume=True, save_every=5, eval_every=5)
    assert res.resumed_from == 5 and res.step == 10
    assert len(res.losses) == 10 and res.losses == pytest.approx(ref.losses, abs=1e-6)  # the curve continues
    assert [e["step"] for e in res.eval_history] == [0, 5, 10]
    assert res.tokens == ref.tokens
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_resume_without_checkpoint_starts_over_and_ignores_half_written_ones(tmp_path):
    (tmp_path / "checkpoints" / "step-8.tmp").mkdir(parents=True)
    _, res = run(tmp_path, 3, resume=True)
    assert res.resumed_from is None and res.step == 3


def test_resume_refuses_other_settings(tmp_path):
    run(tmp_path, 4, save_every=2)
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cfg = LoopConfig(max_steps=4, out=tmp_path, resume=True, progress=False, fingerprint={"lr": 5.0})
    with pytest.raises(ResumeError, match="differ in lr"):
        train_loop(model, epoch_batches, lambda b: (model(b[0]).sum(), 1), cfg, optimizer=opt)


def test_accumulation_equals_a_larger_batch(tmp_path):
    # 2 x 2 examples accumulated vs 4 at once: the same mean loss, so the same updates
    a, ra = run(tmp_path / "a", 6, grad_accum=2, size=2, dropout=0.0)
    b, rb = run(tmp_path / "b", 6, grad_accum=1, size=4, dropout=0.0)
    assert ra.step == rb.step == 6 and ra.tokens == rb.tokens == 24
    assert ra.losses == pytest.approx(rb.losses, rel=1e-5)
    for p, q, before in zip(a.parameters(), b.parameters(), make_model(dropout=0.0).parameters()):
        assert torch.allclose(p, q, atol=1e-6) and not torch.equal(p, before)


def test_evaluation_every_k_steps(tmp_path):
    _, res = run(tmp_path, 7, eval_every=3)
    assert [e["step"] for e in res.eval_history] == [0, 3, 6, 7]
    assert res.eval_history[-1]["loss"] < res.eval_history[0]["loss"]
