"""One training loop for `adapters train` and `compress distill`: gradient accumulation, a tqdm
bar, evaluation every `eval_every` steps, checkpoints every `save_every` steps, and resume.

The caller supplies what differs: `batches(epoch)` (the epoch's batches, in an order that depends
on the epoch number alone, so a resumed run can rebuild it and skip to its position), `loss_fn(batch)
-> (loss, tokens)`, `evaluate() -> {name: figure}` and `save_model(folder)` (the servable files).

A checkpoint folder `OUT/checkpoints/step-N` holds the servable files plus what resuming needs:
`trainable.safetensors` (the parameters that train), `optimizer.pt` (optimizer, scheduler and RNG
states) and `trainer_state.json` (step, data position, tokens, loss curve, eval history, and the
caller's fingerprint of the run's settings). It is written under a temporary name and renamed, so
a run killed mid-write leaves no half checkpoint that `resume` would pick.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

STATE = "trainer_state.json"


class ResumeError(ValueError):
    pass


@dataclass
class LoopConfig:
    max_steps: int
    out: Path
    grad_accum: int = 1
    eval_every: int = 0
    save_every: int = 0
    resume: bool = False
    clip_norm: float = 1.0
    desc: str = "train"
    progress: bool = True
    fingerprint: dict[str, Any] = field(default_factory=dict)  # settings a resumed run must share


@dataclass
class LoopResult:
    step: int = 0
    tokens: int = 0
    losses: list[float] = field(default_factory=list)
    eval_history: list[dict[str, float]] = field(default_factory=list)  # step 0 is "before"
    resumed_from: int | None = None
    seconds: float = 0.0  # training time, summed over resumed runs
    # where the next batch comes from: epoch number and index into that epoch's batch list
    epoch: int = 0
    position: int = 0


def latest_checkpoint(out: Path) -> Path | None:
    folders = [p for p in (Path(out) / "checkpoints").glob("step-*") if (p / STATE).is_file()]
    return max(folders, key=lambda p: int(p.name.split("-")[1]), default=None)


def train_loop(model, batches: Callable[[int], Sequence[Any]], loss_fn: Callable[[Any], tuple[torch.Tensor, int]],
               cfg: LoopConfig, *, optimizer, scheduler=None, evaluate: Callable[[], dict] | None = None,
               save_model: Callable[[Path], None] | None = None) -> LoopResult:
    from tqdm import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    state = LoopResult()
    if cfg.resume and (ckpt := latest_checkpoint(cfg.out)) is not None:
        state = _load(ckpt, model, optimizer, scheduler, cfg.fingerprint)
        state.resumed_from = state.step
    bar = tqdm(total=cfg.max_steps, initial=state.step, desc=cfg.desc, unit="step", disable=not cfg.progress)

    def run_eval() -> None:
        figures = {k: round(float(v), 4) for k, v in evaluate().items()}
        state.eval_history.append({"step": state.step, **figures})
        bar.set_postfix_str(_postfix(state))
        model.train()

    if evaluate and not state.eval_history:
        run_eval()
    model.train()
    started = time.perf_counter() - state.seconds
    epoch_batches = batches(state.epoch) if state.step < cfg.max_steps else []
    while state.step < cfg.max_steps:
        if state.position >= len(epoch_batches):
            state.epoch, state.position = state.epoch + 1, 0
            epoch_batches = batches(state.epoch)
            if not epoch_batches:
                raise ValueError("the training data gives no batches")
            continue
        group = epoch_batches[state.position:state.position + cfg.grad_accum]
        step_loss = 0.0
        for batch in group:
            loss, tokens = loss_fn(batch)
            (loss / len(group)).backward()  # mean over the group, as one large batch would give
            step_loss += float(loss.detach()) / len(group)
            state.tokens += tokens
        torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.position += len(group)
        state.losses.append(step_loss)
        bar.update()
        bar.set_postfix_str(_postfix(state), refresh=False)
        if evaluate and cfg.eval_every and state.step % cfg.eval_every == 0:
            run_eval()
        if cfg.save_every and state.step % cfg.save_every == 0:
            state.seconds = time.perf_counter() - started
            _save(cfg, state, model, params, optimizer, scheduler, save_model)
    bar.close()
    if evaluate and state.eval_history[-1]["step"] != state.step:
        run_eval()
    state.seconds = round(time.perf_counter() - started, 1)
    return state


def _postfix(state: LoopResult) -> str:
    """The last step's loss and the latest evaluation's figures, for the progress bar."""
    parts = [f"loss={state.losses[-1]:.3f}"] if state.losses else []
    if state.eval_history:
        parts += [f"eval_{k}={v:.3f}" for k, v in state.eval_history[-1].items() if k != "step"]
    return ", ".join(parts)


def _save(cfg: LoopConfig, state: LoopResult, model, params, optimizer, scheduler, save_model) -> None:
    from safetensors.torch import save_file

    final = Path(cfg.out) / "checkpoints" / f"step-{state.step}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if save_model is not None:
        save_model(tmp)
    names = {id(p): n for n, p in model.named_parameters()}
    save_file({names[id(p)]: p.detach().contiguous() for p in params}, tmp / "trainable.safetensors")
    torch.save({"optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}, tmp / "optimizer.pt")
    fields = {k: v for k, v in vars(state).items() if k != "resumed_from"}
    (tmp / STATE).write_text(json.dumps({**fields, "fingerprint": cfg.fingerprint}, default=str))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def _load(folder: Path, model, optimizer, scheduler, fingerprint: dict) -> LoopResult:
    from safetensors.torch import load_file

    saved = json.loads((folder / STATE).read_text())
    theirs = saved.pop("fingerprint", {})
    differ = sorted(k for k in set(theirs) | set(fingerprint) if theirs.get(k) != json.loads(
        json.dumps(fingerprint.get(k), default=str)))
    if differ:
        raise ResumeError(f"cannot resume from {folder}: the run's settings differ in {', '.join(differ)}; "
                          "resume with the same settings, or drop --resume to start over")
    weights = load_file(folder / "trainable.safetensors")
    named = dict(model.named_parameters())
    missing = [n for n in weights if n not in named]
    if missing:
        raise ResumeError(f"cannot resume from {folder}: the model has no parameter {missing[0]}")
    with torch.no_grad():
        for n, w in weights.items():
            named[n].copy_(w)
    extra = torch.load(folder / "optimizer.pt", weights_only=False)  # our own file: RNG states are tuples
    optimizer.load_state_dict(extra["optimizer"])
    if scheduler is not None and extra["scheduler"] is not None:
        scheduler.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["torch_rng"])
    random.setstate(extra["python_rng"])
    return LoopResult(**saved)
