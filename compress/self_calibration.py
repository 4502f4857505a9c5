"""Calibration text without a file: the model writes its own (data-free calibration, as in LLM-QAT).

GPTQ and AWQ need activations that look like what the model will see. A model's own samples from
a fixed, seeded set of generic openings are such text, and need nothing but the weights. The same
model, seed and settings give the same texts, so the quantized artifact is reproducible (and its
cache key is the recipe, not the texts)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

# Bump when the openings or the sampling below change: cached artifacts made from the old texts
# must not be taken for the new recipe's.
VERSION = 1

OPENINGS = (
    "Once upon a time", "The history of", "Here is a recipe for", "Dear colleague,", "In this tutorial we",
    "The main reasons why", "Q: What is the capital of", "def main():", "Breaking news:", "The weather today",
    "Scientists have discovered", "Step 1:", "My favourite book is", "The meeting agenda:", "import numpy as np",
    "Summary of the report:", "The patient presented with", "In mathematics, a prime number", "Chapter 1",
    "To install the package,", "The court ruled that", "Customer review:", "Photosynthesis is", "SELECT name FROM",
    "The following is a conversation", "Translate to French:", "Once the water boils,", "The stock market",
    "A haiku about autumn:", "Error: file not found", "Thank you for your order", "The universe began",
)
TEMPERATURE = 0.8
TOP_P = 0.95
BATCH = 8


def self_calibration_texts(model_path: Path, num_samples: int, seq_len: int, seed: int = 0,
                           progress: Callable[[int, int], None] | None = None) -> list[str]:
    """`num_samples` texts of up to `seq_len` tokens, sampled by the model from OPENINGS in fp32 on
    the CPU (the same numbers on every run of this machine)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    openings = [OPENINGS[i % len(OPENINGS)] for i in range(num_samples)]
    texts: list[str] = []
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        for start in range(0, num_samples, BATCH):
            batch = tok(openings[start:start + BATCH], return_tensors="pt", padding=True)
            with torch.inference_mode():
                out = model.generate(**batch, do_sample=True, temperature=TEMPERATURE, top_p=TOP_P,
                                     max_new_tokens=seq_len, min_new_tokens=seq_len // 4,
                                     pad_token_id=tok.pad_token_id)
            texts.extend(tok.batch_decode(out, skip_special_tokens=True))
            if progress is not None:
                progress(len(texts), num_samples)
    finally:
        torch.random.set_rng_state(generator_state)  # a caller's own sampling is not disturbed
    return texts
