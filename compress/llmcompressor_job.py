"""Runs inside the separate llm-compressor environment (its pins clash with vLLM's), so it imports
nothing from slimserve: `python llmcompressor_job.py JOB.json`. Writes a compressed-tensors model
folder that vLLM (and transformers) load natively.

JOB.json: {"model", "out", "method": gptq|rtn|int8, "bits", "group_size", "sym", "seq_len", "texts": [...]}
"""

from __future__ import annotations

import json
import sys


def recipe(method: str, bits: int, group_size: int, sym: bool):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    if method == "int8":  # W8A8: int8 weights per channel, int8 activations per token (dynamic)
        return QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=sym,
                               strategy="group" if group_size > 0 else "channel",
                               group_size=group_size if group_size > 0 else None)
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    if method == "gptq":
        return GPTQModifier(config_groups=groups, ignore=["lm_head"])
    return QuantizationModifier(config_groups=groups, ignore=["lm_head"])  # rtn


def main(job_path: str) -> int:
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job = json.loads(open(job_path).read())
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype="auto")
    texts = job["texts"] or ["calibration is not used by round-to-nearest"]
    data = Dataset.from_dict({"text": texts}).map(
        lambda row: tokenizer(row["text"], truncation=True, max_length=job["seq_len"], add_special_tokens=False),
        remove_columns=["text"])
    oneshot(model=model, dataset=data, recipe=recipe(job["method"], job["bits"], job["group_size"], job["sym"]),
            max_seq_length=job["seq_len"], num_calibration_samples=len(texts))
    model.save_pretrained(job["out"], save_compressed=True)
    tokenizer.save_pretrained(job["out"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
