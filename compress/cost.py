"""What one output token of a model costs, measured, and kept in its manifest (`cost` in slimserve.json).

`seconds_per_token` is device-seconds per generated token in a batch-1 greedy decode loop with a KV
cache: on CPU the process's CPU time (all threads together), so neighbours on a shared machine that
steal wall time do not inflate it; on a GPU the wall time of the synchronised loop. Memory is the
weights' bytes and the KV cache each token adds. The router compares these figures between models,
so they must be measured the same way on the same machine; `device` and `threads` say how.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from compress.manifest import read_manifest, update_manifest

KEY = "cost"  # the manifest key


@dataclass
class Cost:
    seconds_per_token: float
    device: str = "cpu"
    threads: int | None = None
    batch: int = 1
    dtype: str | None = None
    weight_bytes: int | None = None
    kv_bytes_per_token: int | None = None
    wall_seconds_per_token: float | None = None
    measured: str | None = None  # when and with what: "2026-12-03T10:00:00Z compress eval"

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def read_cost(folder: Path) -> dict | None:
    """The manifest's `cost` mapping as written (the server validates it), or None."""
    manifest = read_manifest(folder) or {}
    cost = manifest.get(KEY)
    return cost if isinstance(cost, dict) else None


def write_cost(folder: Path, cost: Cost) -> Path:
    """Record the cost in the folder's manifest, keeping every other field."""
    return update_manifest(folder, **{KEY: cost.as_dict()})


def kv_bytes_per_token(model) -> int | None:
    """K and V of every layer for one token, in the model's dtype (what each generated token adds)."""
    cfg = model.config.get_text_config()
    layers, heads = getattr(cfg, "num_hidden_layers", None), getattr(cfg, "num_attention_heads", None)
    if not layers or not heads:
        return None
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return 2 * layers * kv_heads * head_dim * next(model.parameters()).element_size()


def measure_cost(model, steps: int = 32, prompt_len: int = 16, warmup: int = 4, how: str = "") -> Cost:
    """Decode `steps` tokens at batch 1 after a short prompt and `warmup` untimed steps."""
    import torch
    from transformers import DynamicCache

    from compress.load_time import weight_bytes

    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, min(1000, vocab), (1, prompt_len), generator=torch.Generator().manual_seed(0)).to(device)
    cache = DynamicCache()
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        for i in range(warmup + steps):
            if i == warmup:
                if cuda:
                    torch.cuda.synchronize(device)
                cpu0, wall0 = time.process_time(), time.perf_counter()
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        if cuda:
            torch.cuda.synchronize(device)
    cpu, wall = (time.process_time() - cpu0) / steps, (time.perf_counter() - wall0) / steps
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return Cost(seconds_per_token=wall if cuda else cpu, device=str(device),
                threads=None if cuda else torch.get_num_threads(), batch=1,
                dtype=str(next(model.parameters()).dtype).removeprefix("torch."), weight_bytes=weight_bytes(model),
                kv_bytes_per_token=kv_bytes_per_token(model), wall_seconds_per_token=wall,
                measured=f"{stamp} {how}".strip())


def cost_of(folder: Path, dtype=None, measure: bool = True) -> dict | None:
    """The folder's recorded cost; else, when `measure`, a fresh measurement (not written). `FOLDER@int8`
    (quantized at load) has no manifest of its own: it is measured."""
    recorded = None if "@" in str(folder) else read_cost(folder)
    if recorded is not None or not measure:
        return recorded
    import torch

    from compress.greedy import load_generator

    model, _ = load_generator(folder, dtype or torch.float32)
    return measure_cost(model, how=f"measured for this run, {os.cpu_count()} CPUs").as_dict()
