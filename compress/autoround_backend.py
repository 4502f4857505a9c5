"""`--method autoround`: Intel's auto-round (SignRound) on a CPU, written in the GPTQ layout.

SignRound tunes each decoder block's rounding offsets and clipping ranges with signed gradient
steps against the block's full-precision output on the calibration text; then the block's weights
are packed as GPTQ (`auto_gptq` format), which transformers (through GPTQModel) and vLLM load
like any GPTQ checkpoint, per-module bits included (`dynamic` in config.json). The light settings
that fit a 2-core CPU are the spec's: `iters` steps per block (auto-round's default is 200),
`num_samples` passages of `seq_len` tokens, batch 4 (auto-round: 8).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def packed_samples(tok, texts: list[str], seq_len: int, limit: int) -> list:
    """The passages' tokens end to end (an EOS between passages), cut into rows of exactly seq_len:
    auto-round skips any sample shorter than its seqlen, which would drop most short passages."""
    import torch

    ids: list[int] = []
    for t in texts:
        ids += tok.encode(t, add_special_tokens=False) + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
    rows = [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)][:limit]
    return [torch.tensor([r]) for r in rows]


def run_autoround(spec, bits: int, texts: list[str], out: Path) -> None:
    from auto_round import AutoRound
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec.model)
    samples = packed_samples(tok, texts, spec.seq_len, spec.num_samples)
    if not samples:
        raise ValueError(f"the calibration text holds fewer than {spec.seq_len} tokens; lower --seq-len")
    layer_config = {name: {"bits": b} for name, b in (spec.module_bits or {}).items()}
    ar = AutoRound(str(spec.model), tokenizer=tok, scheme="W4A16", bits=bits, group_size=spec.group_size,
                   sym=spec.sym, dataset=samples, iters=spec.iters, nsamples=len(samples), seqlen=spec.seq_len,
                   batch_size=min(4, len(samples)), device_map="cpu", seed=spec.seed,
                   enable_torch_compile=False,  # compiling each block costs more than it saves at these sizes
                   layer_config=layer_config or None)
    staging = out.with_name(out.name + ".autoround")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        ar.quantize_and_save(str(staging), format="auto_gptq")
        # auto-round writes into a subfolder named after the model and scheme; keep only that
        inner = [p for p in staging.iterdir() if (p / "config.json").is_file()]
        written = inner[0] if inner else staging
        os.replace(written, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
