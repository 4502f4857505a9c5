"""Simulating a killed training run, for the resume tests."""

from __future__ import annotations

import torch


def stop_after_steps(monkeypatch, n: int) -> None:
    """The optimizer's (n+1)-th step raises, as if the process were interrupted there."""
    real, calls = torch.optim.AdamW.step, {"n": 0}

    def step(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] > n:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
