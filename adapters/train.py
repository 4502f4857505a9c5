"""Fine-tuning in the seed's three modes: `lora` (PEFT adapter), `partial` (last N blocks or named
modules), `full`. AdamW with a linear decay, driven by the shared loop in `compress.training`
(accumulation, periodic held-out loss, checkpoints, resume); a slimserve.json manifest with the figures."""

from __future__ import annotations

import math
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from compress.data import IGNORE, Example, pad_batches as _batches, read_records, tokenize
from compress.manifest import file_hash, write_manifest


@dataclass
class TrainConfig:
    base: str
    data: Path
    out: Path
    mode: Literal["lora", "partial", "full"] = "lora"
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    last_n_blocks: int = 2
    train_modules: str | None = None  # regex over parameter names, for partial mode
    epochs: float = 1.0
    max_steps: int | None = None
    lr: float = 2e-4
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 256
    eval_fraction: float = 0.1
    max_eval_examples: int = 64
    save_every: int = 0
    eval_every: int = 0  # held-out loss every N steps into the manifest's eval_history (0: before/after only)
    resume: bool = False  # continue from the newest checkpoint under out/checkpoints
    seed: int = 0
    base_name: str | None = None  # what the manifest and adapter_config call the base


@torch.no_grad()
def evaluate(model, examples: list[Example], batch_size: int, pad_id: int) -> float:
    """Mean loss per predicted token over the held-out examples."""
    model.eval()
    total, count = 0.0, 0
    for ids, mask, labels in _batches(examples, batch_size, pad_id):
        n = int((labels[:, 1:] != IGNORE).sum())
        if n:
            total += float(model(input_ids=ids, attention_mask=mask, labels=labels).loss) * n
            count += n
    model.train()
    return total / max(count, 1)


def _prepare(model, cfg: TrainConfig):
    if cfg.mode == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
        return get_peft_model(model, lora)
    for p in model.parameters():
        p.requires_grad_(cfg.mode == "full")
    if cfg.mode == "partial":
        if cfg.train_modules:
            pattern = re.compile(cfg.train_modules)
            chosen = [p for n, p in model.named_parameters() if pattern.search(n)]
        else:
            layers = model.get_decoder().layers
            chosen = [p for block in list(layers)[-cfg.last_n_blocks:] for p in block.parameters()]
        if not chosen:
            raise ValueError("partial mode selected no parameters; check --last-n-blocks / --train-modules")
        for p in chosen:
            p.requires_grad_(True)
    return model


def train(cfg: TrainConfig, progress: bool = True) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.training import LoopConfig, train_loop

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.base)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples = tokenize(read_records(cfg.data), tokenizer, cfg.seq_len)
    if len(examples) < 2:
        raise ValueError(f"{cfg.data} gives {len(examples)} usable examples; need at least 2")
    random.shuffle(examples)
    n_eval = min(cfg.max_eval_examples, max(1, int(len(examples) * cfg.eval_fraction)))
    held_out, train_set = examples[:n_eval], examples[n_eval:]

    model = AutoModelForCausalLM.from_pretrained(cfg.base, dtype=torch.float32)
    model = _prepare(model, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(train_set) / (cfg.batch_size * cfg.grad_accum))
    total_steps = cfg.max_steps or max(1, math.ceil(steps_per_epoch * cfg.epochs))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / total_steps))

    def epoch_batches(epoch: int) -> list:
        order = list(train_set)
        random.Random(cfg.seed * 1_000_003 + epoch).shuffle(order)  # rebuildable on resume
        return list(_batches(order, cfg.batch_size, pad_id))

    def loss_fn(batch):
        ids, mask, labels = batch
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss, int(mask.sum())

    loop = LoopConfig(max_steps=total_steps, out=cfg.out, grad_accum=cfg.grad_accum, eval_every=cfg.eval_every,
                      save_every=cfg.save_every, resume=cfg.resume, desc=f"train {cfg.mode}", progress=progress,
                      fingerprint=_fingerprint(cfg))
    run = train_loop(model, epoch_batches, loss_fn, loop, optimizer=optimizer, scheduler=scheduler,
                     evaluate=lambda: {"loss": evaluate(model, held_out, cfg.batch_size, pad_id)},
                     save_model=lambda folder: _save(model, tokenizer, cfg, folder))
    _save(model, tokenizer, cfg, cfg.out)
    losses = run.losses
    report = {
        "base": cfg.base_name or str(cfg.base),
        "mode": cfg.mode,
        "data": str(cfg.data),
        "data_sha256": file_hash(cfg.data),
        "examples": {"train": len(train_set), "held_out": len(held_out)},
        "steps": run.step,
        "tokens": run.tokens,
        "trainable_parameters": n_trainable,
        "seconds": run.seconds,
        "resumed_from_step": run.resumed_from,
        "held_out_loss": {"before": run.eval_history[0]["loss"], "after": run.eval_history[-1]["loss"]},
        "eval_history": run.eval_history,
        "train_loss": {"first": round(losses[0], 4), "last": round(losses[-1], 4),
                       "curve": [round(x, 4) for x in losses[:: max(1, len(losses) // 50)]]},
        "settings": {k: v for k, v in asdict(cfg).items() if k not in ("base", "data", "out")},
    }
    write_manifest(cfg.out, "adapter" if cfg.mode == "lora" else "model", **report)
    return report


def _fingerprint(cfg: TrainConfig) -> dict:
    """What a resumed run must share with the interrupted one (not the step budget or eval cadence)."""
    keep = {k: v for k, v in asdict(cfg).items() if k not in ("out", "resume", "eval_every", "save_every")}
    return {**keep, "data": str(cfg.data), "data_sha256": file_hash(cfg.data)}


def _save(model, tokenizer, cfg: TrainConfig, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    if cfg.mode == "lora":
        if cfg.base_name:  # name the base as users know it, not a cache path
            import json

            cfg_path = folder / "adapter_config.json"
            data = json.loads(cfg_path.read_text())
            data["base_model_name_or_path"] = cfg.base_name
            cfg_path.write_text(json.dumps(data, indent=2))
    else:
        tokenizer.save_pretrained(folder)
