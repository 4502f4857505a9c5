"""Make real PEFT LoRA adapter folders for the tiny model (random, non-zero B so they change outputs)."""

from __future__ import annotations

from pathlib import Path

import torch


def make_adapter(base_dir: Path, out_dir: Path, *, rank: int = 4, alpha: int = 8, seed: int = 0,
                 targets: tuple[str, ...] = ("q_proj", "v_proj", "down_proj"), scale_b: float = 1.0) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                        init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(scale_b)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
