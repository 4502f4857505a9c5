"""Fine-tuning in the seed's three modes: `lora` (PEFT adapter), `partial` (last N blocks or named
modules), `full`. A plain PyTorch loop: AdamW, gradient accumulation, held-out loss before and
after, periodic checkpoints, and a slimserve.json manifest with the figures."""

from __future__ import annotations

import math
import random
import re
import time
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
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

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

    eval_before = evaluate(model, held_out, cfg.batch_size, pad_id)
    model.train()
    losses: list[float] = []
    tokens = 0
    step = 0
    started = time.perf_counter()
    bar = tqdm(total=total_steps, desc=f"train {cfg.mode}", unit="step", disable=not progress)
    while step < total_steps:
        random.shuffle(train_set)
        batches = list(_batches(train_set, cfg.batch_size, pad_id))
        for i in range(0, len(batches), cfg.grad_accum):
            group = batches[i:i + cfg.grad_accum]
            step_loss = 0.0
            for ids, mask, labels in group:
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss / len(group)
                loss.backward()
                step_loss += float(loss.detach())
                tokens += int(mask.sum())
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(step_loss)
            bar.update()
            bar.set_postfix(loss=f"{step_loss:.3f}")
            if cfg.save_every and step % cfg.save_every == 0:
                _save(model, tokenizer, cfg, cfg.out / "checkpoints" / f"step-{step}")
            if step >= total_steps:
                break
    bar.close()
    eval_after = evaluate(model, held_out, cfg.batch_size, pad_id)
    _save(model, tokenizer, cfg, cfg.out)
    report = {
        "base": cfg.base_name or str(cfg.base),
        "mode": cfg.mode,
        "data": str(cfg.data),
        "data_sha256": file_hash(cfg.data),
        "examples": {"train": len(train_set), "held_out": len(held_out)},
        "steps": step,
        "tokens": tokens,
        "trainable_parameters": n_trainable,
        "seconds": round(time.perf_counter() - started, 1),
        "held_out_loss": {"before": round(eval_before, 4), "after": round(eval_after, 4)},
        "train_loss": {"first": round(losses[0], 4), "last": round(losses[-1], 4),
                       "curve": [round(x, 4) for x in losses[:: max(1, len(losses) // 50)]]},
        "settings": {k: v for k, v in asdict(cfg).items() if k not in ("base", "data", "out")},
    }
    write_manifest(cfg.out, "adapter" if cfg.mode == "lora" else "model", **report)
    return report


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
