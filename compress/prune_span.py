"""`slimserve compress prune --contiguous N [--heal-steps S]`: drop the contiguous span of N blocks
whose input and output differ least (compress.span), and, with healing, put one fitted block in its
place (compress.heal): the student keeps blocks - N + 1 blocks, or blocks - N without healing.

Calibration: the span is scored on `calibration_texts` (as `compress prune` scores blocks); healing
fits on the same file tokenized as training data (chat rows through the chat template), 10% of it
(at least one example) held out to report the span's MSE for: nothing in its place (identity), the
initial block unfitted, and the fitted block.
"""

from __future__ import annotations

import copy
import random
import time
from pathlib import Path

import torch

from compress.calibration import calibration_texts
from compress.data import read_records, tokenize
from compress.heal import capture_span, fit_block, span_mse
from compress.manifest import file_hash
from compress.prune import check_out, decoder_layers, drop_layers, save_pruned
from compress.span import choose_span, score_spans


def prune_span(model_dir: Path, out: Path, *, calib: Path, length: int, heal_steps: int = 0, heal_init: str = "last",
               heal_lr: float = 1e-4, heal_samples: int = 256, num_samples: int = 32, seq_len: int = 256,
               protect_last: bool = True, seed: int = 0) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if heal_init not in ("first", "last"):
        raise ValueError(f"--heal-init must be first or last, not {heal_init!r}")
    if heal_steps < 0:
        raise ValueError(f"--heal-steps must be >= 0, not {heal_steps}")
    check_out(out)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").eval()
    saved_dtype = next(model.parameters()).dtype
    model.float()
    layers = decoder_layers(model)
    n = len(layers)
    if not 0 < length < n:
        raise ValueError(f"--contiguous must be between 1 and {n - 1} of the {n} blocks, not {length}")
    started = time.perf_counter()
    texts = calibration_texts(calib, num_samples)
    batches = [torch.tensor([tokenizer.encode(t, add_special_tokens=False)[:seq_len]]) for t in texts]
    distances = score_spans(model, layers, [b for b in batches if b.shape[1] > 1], length)
    start = choose_span(distances, protect_last=protect_last)
    span = list(range(start, start + length))
    report = {
        "source_model": str(model_dir), "method": "contiguous-span", "blocks_before": n,
        "span": {"start": start, "length": length, "blocks": span, "angular_distance": round(distances[start], 6)},
        "span_distances": [{"start": s, "angular_distance": round(d, 6)} for s, d in enumerate(distances)],
        "calibration_sha256": file_hash(calib), "calibration_samples": len(batches),
    }
    if heal_steps:
        keep = span[-1] if heal_init == "last" else span[0]
        report["heal"] = _heal(model, layers, tokenizer, calib, start, length, keep, heal_steps, heal_lr,
                               heal_samples, seq_len, seed)
        dropped = [i for i in span if i != keep]
    else:
        dropped = span
    drop_layers(model, dropped)
    report.update(blocks_after=n - len(dropped), dropped=[{"block": i} for i in dropped],
                  seconds=round(time.perf_counter() - started, 1))
    save_pruned(model.to(saved_dtype), tokenizer, out, report)
    return report


def _heal(model, layers, tokenizer, calib: Path, start: int, length: int, keep: int, steps: int, lr: float,
          samples: int, seq_len: int, seed: int) -> dict:
    """Fit a copy of block `keep` to map the span's input to its output; install it at `keep`."""
    examples = tokenize(read_records(calib), tokenizer, seq_len)
    random.Random(seed).shuffle(examples)
    examples = [e for e in examples if len(e.input_ids) > 1][:samples]
    if len(examples) < 2:
        raise ValueError(f"{calib} gives {len(examples)} usable examples to heal on; need at least 2")
    pairs = capture_span(model, layers, start, length, [torch.tensor([e.input_ids]) for e in examples])
    n_eval = max(1, len(pairs) // 10)
    held, train = pairs[:n_eval], pairs[n_eval:]
    block = copy.deepcopy(layers[keep])
    before = {"identity": span_mse(None, held), "init_block": span_mse(block, held)}
    fit = fit_block(block, train, steps=steps, lr=lr, seed=seed)
    after = span_mse(block, held)
    layers[keep].load_state_dict(block.state_dict())
    return {"init_from_block": keep, **fit, "examples": {"train": len(train), "held_out": len(held)},
            "held_out_mse": {k: round(v, 6) for k, v in {**before, "healed": after}.items()}}
