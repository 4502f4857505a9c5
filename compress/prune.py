"""`slimserve compress prune`: drop the decoder blocks that change the hidden state least.

Block influence (ShortGPT, Men et al. 2024): BI_i = 1 - mean over tokens of cos(x_i, y_i), where
x_i and y_i are block i's input and output hidden states on calibration text. A block whose output
points where its input already pointed does little; dropping the lowest-BI blocks costs least.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from torch import nn

from compress.calibration import calibration_texts
from compress.manifest import file_hash, write_manifest


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError("cannot find the decoder blocks (model.model.layers) of this model")
    return layers


def influence(inputs: torch.Tensor, outputs: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """1 - mean cosine similarity between a block's input and output hidden states (pure)."""
    cos = torch.nn.functional.cosine_similarity(inputs.float(), outputs.float(), dim=-1)
    if mask is not None:
        return float(1 - (cos * mask).sum() / mask.sum())
    return float(1 - cos.mean())


@torch.no_grad()
def block_influence(model: nn.Module, batches: list[torch.Tensor]) -> list[float]:
    layers = decoder_layers(model)
    totals = [0.0] * len(layers)
    hooks = []

    def hook(index):
        def capture(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            totals[index] += influence(x, y)
        return capture

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(hook(i), with_kwargs=True))
    try:
        for ids in batches:
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return [t / len(batches) for t in totals]


def drop_layers(model: nn.Module, drop: list[int]) -> nn.Module:
    """Remove blocks `drop` in place, renumbering the rest (their KV-cache indices) and the config."""
    layers = decoder_layers(model)
    keep = [i for i in range(len(layers)) if i not in set(drop)]
    model.model.layers = nn.ModuleList(layers[i] for i in keep)
    for new_index, layer in enumerate(model.model.layers):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_index
    text = model.config.get_text_config()
    text.num_hidden_layers = len(keep)
    if getattr(text, "layer_types", None):
        text.layer_types = [text.layer_types[i] for i in keep]
    return model


def prune(model_dir: Path, out: Path, *, calib: Path, drop: int | None = None, keep_ratio: float | None = None,
          num_samples: int = 32, seq_len: int = 256) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (drop is None) == (keep_ratio is None):
        raise ValueError("give exactly one of --drop-layers N or --keep-ratio R")
    check_out(out)
    texts = calibration_texts(calib, num_samples)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").eval()
    saved_dtype = next(model.parameters()).dtype
    model.float()  # score in full precision
    n = len(decoder_layers(model))
    count = drop if drop is not None else n - max(1, round(n * keep_ratio))
    if not 0 < count < n:
        raise ValueError(f"can drop between 1 and {n - 1} of the {n} blocks, not {count}")
    started = time.perf_counter()
    batches = [torch.tensor([tokenizer.encode(t, add_special_tokens=False)[:seq_len]]) for t in texts]
    scores = block_influence(model, [b for b in batches if b.shape[1] > 1])
    ranking = sorted(range(n), key=lambda i: scores[i])
    dropped = sorted(ranking[:count])
    drop_layers(model, dropped)
    report = {
        "source_model": str(model_dir), "method": "block-influence", "blocks_before": n, "blocks_after": n - count,
        "dropped": [{"block": i, "influence": round(scores[i], 6)} for i in dropped],
        "ranking": [{"block": i, "influence": round(scores[i], 6)} for i in ranking],
        "calibration_sha256": file_hash(calib), "calibration_samples": len(batches),
        "seconds": round(time.perf_counter() - started, 1),
    }
    save_pruned(model.to(saved_dtype), tokenizer, out, report)
    return report


def check_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty")


def save_pruned(model: nn.Module, tokenizer, out: Path, report: dict) -> None:
    """Model, tokenizer and manifest into a hidden folder, renamed to `out` when all are written."""
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    write_manifest(tmp, "pruned-model", **report)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
