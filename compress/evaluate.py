"""`slimserve compress eval REF VARIANT...`: how much smaller, how much worse, how much faster.

For the reference and each variant: perplexity on held-out text, mean KL divergence of next-token
distributions against the reference and top-1 agreement with it, weight bytes, file bytes, load
time, and decode tokens/s at batch 1 and 8. A variant is a model folder (a quantized, pruned or
distilled artifact) or `REF@int8` / `REF@nf4` / `REF@int4` for quantization at load time. Writes
JSON, a Markdown table and a PNG plot.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from compress.bit_cost import artifact_bits
from compress.load_time import load_time_config, weight_bytes


@dataclass
class Report:
    name: str
    perplexity: float
    kl_vs_ref: float
    top1_agreement: float
    weight_bytes: int
    file_bytes: int
    load_seconds: float
    decode_tok_s_b1: float
    decode_tok_s_b8: float
    bits_per_weight: float | None = None  # decoder linear layers, as stored (compress/bit_cost.py); None at load


def load_variant(spec: str, dtype: torch.dtype = torch.bfloat16):
    """(model, tokenizer, folder, load seconds) for a folder or `folder@method`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, _, method = spec.partition("@")
    kwargs = {}
    if method:
        kwargs = {"quantization_config": load_time_config(method, dtype), "device_map": "cpu"}
    from transformers import AutoConfig

    from compress.mixed_gptq import is_mixed_gptq, load_dequantized

    start = time.perf_counter()
    if not method and is_mixed_gptq(AutoConfig.from_pretrained(folder)):
        model = load_dequantized(Path(folder), dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs).eval()
    seconds = time.perf_counter() - start
    return model, AutoTokenizer.from_pretrained(folder), Path(folder), seconds


def token_windows(tokenizer, text: str, seq_len: int, max_tokens: int) -> list[torch.Tensor]:
    ids = tokenizer.encode(text, add_special_tokens=False)[:max_tokens]
    return [torch.tensor([ids[i:i + seq_len]]) for i in range(0, len(ids) - 1, seq_len) if len(ids[i:i + seq_len]) > 1]


@torch.no_grad()
def logits_over(model, windows: list[torch.Tensor]) -> list[torch.Tensor]:
    return [model(w).logits[0].float() for w in windows]


def perplexity(logits: list[torch.Tensor], windows: list[torch.Tensor]) -> float:
    nll, count = 0.0, 0
    for lg, w in zip(logits, windows):
        targets = w[0, 1:]
        nll += float(torch.nn.functional.cross_entropy(lg[:-1], targets, reduction="sum"))
        count += len(targets)
    return math.exp(nll / count)


def kl_and_agreement(ref: list[torch.Tensor], var: list[torch.Tensor]) -> tuple[float, float]:
    """Mean KL(ref || variant) per token, and the share of positions whose argmax agrees."""
    kl, agree, count = 0.0, 0, 0
    for r, v in zip(ref, var):
        kl += float(torch.nn.functional.kl_div(v.log_softmax(-1), r.log_softmax(-1), log_target=True,
                                               reduction="sum"))
        agree += int((r.argmax(-1) == v.argmax(-1)).sum())
        count += r.shape[0]
    return kl / count, agree / count


@torch.no_grad()
def decode_speed(model, batch: int, steps: int = 32, prompt_len: int = 16) -> float:
    """Generated tokens/s of a greedy decode loop with a KV cache (what a serving engine runs)."""
    from transformers import DynamicCache

    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, min(1000, vocab), (batch, prompt_len))
    cache = DynamicCache()
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    return batch * steps / (time.perf_counter() - start)


def stored_bits(folder: Path) -> float | None:
    try:
        return artifact_bits(folder)["linear"]
    except (OSError, ValueError, KeyError):  # a layout bit_cost does not read (e.g. compressed-tensors)
        return None


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def evaluate(ref: str, variants: list[str], text_file: Path, out_dir: Path, *, seq_len: int = 256,
             max_tokens: int = 8192, progress: bool = True) -> list[Report]:
    from tqdm import tqdm

    text = Path(text_file).read_text(encoding="utf-8")
    ref_model, tokenizer, ref_folder, ref_load = load_variant(ref)
    windows = token_windows(tokenizer, text, seq_len, max_tokens)
    if not windows:
        raise ValueError(f"{text_file} holds too little text to evaluate on")
    ref_logits = logits_over(ref_model, windows)
    reports = [Report(Path(ref).name, perplexity(ref_logits, windows), 0.0, 1.0, weight_bytes(ref_model),
                      folder_bytes(ref_folder), ref_load, decode_speed(ref_model, 1), decode_speed(ref_model, 8),
                      stored_bits(ref_folder))]
    del ref_model
    for spec in tqdm(variants, desc="variants", disable=not progress):
        model, _, folder, load = load_variant(spec)
        logits = logits_over(model, windows)
        kl, agree = kl_and_agreement(ref_logits, logits)
        folder_part, _, method = spec.partition("@")
        name = f"{Path(folder_part).name}@{method}" if method else Path(spec).name
        reports.append(Report(name, perplexity(logits, windows), kl, agree, weight_bytes(model),
                              0 if "@" in spec else folder_bytes(folder), load, decode_speed(model, 1),
                              decode_speed(model, 8), None if "@" in spec else stored_bits(folder)))
        del model
    write_reports(reports, out_dir, tokens=sum(w.shape[1] for w in windows))
    return reports


def write_reports(reports: list[Report], out_dir: Path, tokens: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    base = reports[0]
    (out_dir / "eval.json").write_text(json.dumps({"eval_tokens": tokens, "reports": [asdict(r) for r in reports]},
                                                  indent=2))
    lines = ["| model | bits/weight (linear) | perplexity | vs ref | KL vs ref | top-1 agree | weight MiB | x ref | "
             "load s | tok/s b1 | tok/s b8 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        bits = f"{r.bits_per_weight:.3f}" if r.bits_per_weight else "at load"
        lines.append(f"| {r.name} | {bits} | {r.perplexity:.3f} | {r.perplexity / base.perplexity - 1:+.1%} | "
                     f"{r.kl_vs_ref:.4f} | {r.top1_agreement:.1%} | {r.weight_bytes / 2**20:.1f} | "
                     f"{r.weight_bytes / base.weight_bytes:.2f} | {r.load_seconds:.1f} | {r.decode_tok_s_b1:.1f} | "
                     f"{r.decode_tok_s_b8:.1f} |")
    (out_dir / "eval.md").write_text("\n".join(lines) + "\n")
    plot(reports, out_dir / "eval.png")


def frontier(sizes: list[float], quality: list[float]) -> list[int]:
    """Indices of the size-vs-quality frontier (lower is better for both), smallest first: the
    points no other point beats on both size and quality."""
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i], quality[i]))
    best, keep = float("inf"), []
    for i in order:
        if quality[i] < best:
            keep.append(i)
            best = quality[i]
    return keep


def plot(reports: list[Report], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    sizes = [r.weight_bytes / 2**20 for r in reports]
    ppl = [r.perplexity for r in reports]
    speed = [r.decode_tok_s_b8 for r in reports]
    dots = ax.scatter(sizes, ppl, s=[40 + 2 * s for s in speed], c=speed, cmap="viridis", edgecolors="black")
    for r, x, y in zip(reports, sizes, ppl):
        ax.annotate(r.name, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
    front = frontier(sizes, ppl)
    ax.step([sizes[i] for i in front], [ppl[i] for i in front], where="post", color="tab:red", linewidth=1,
            label="frontier: nothing smaller is better")
    ax.legend(fontsize=8, loc="upper right")
    ax.margins(x=0.2, y=0.1)  # room for the labels
    ax.set_xlabel("weight MiB")
    ax.set_ylabel("perplexity (held-out text)")
    ax.set_title("size vs quality (dot size and colour: decode tok/s at batch 8)")
    fig.colorbar(dots, ax=ax, label="tok/s, batch 8")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
