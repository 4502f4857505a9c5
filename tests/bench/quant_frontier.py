"""Size vs quality of every SmolLM2 quantization recipe measured (#17): one plot from the recipe
tables' JSON, stored bits per linear weight against held-out perplexity, with the frontier (no
smaller recipe is better) and the target box (<= 4.6 bits, <= +8% perplexity).

    python -m tests.bench.quant_frontier   # reads tests/bench/figures/quant_*_smollm2.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from compress.evaluate import frontier

FIGURES = Path(__file__).parent / "figures"
SOURCES = ("quant_recipes_smollm2.json", "quant_mixed_recovery_smollm2.json")


def rows() -> tuple[float, list[dict]]:
    ref, out = None, []
    for name in SOURCES:
        data = json.loads((FIGURES / name).read_text())
        ref = ref or data["reference"]["perplexity"]
        out += [r for r in data["rows"] if r.get("bits_per_weight_linear") and r.get("perplexity")]
    return ref, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=FIGURES / "quant_frontier_smollm2.png")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref, points = rows()
    bits = [p["bits_per_weight_linear"] for p in points]
    ppl = [p["perplexity"] for p in points]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.scatter(bits, ppl, color="tab:blue", zorder=3)
    for p, x, y in zip(points, bits, ppl):
        ax.annotate(p["method"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    front = frontier(bits, ppl)
    ax.step([bits[i] for i in front], [ppl[i] for i in front], where="post", color="tab:red", label="frontier")
    ax.axhline(ref, color="gray", linestyle=":", label=f"reference {ref:.2f} (Q4_1 GGUF expanded)")
    ax.fill_between([4.0, 4.6], 0, ref * 1.08, color="tab:green", alpha=0.12, label="target: <= 4.6 bits, <= +8%")
    ax.set_xlim(4.2, 4.8)
    ax.set_ylim(ref * 0.97, max(ppl) * 1.03)
    ax.set_xlabel("stored bits per linear weight (scales, zeros, g_idx included)")
    ax.set_ylabel("perplexity, Gospel of John (held out)")
    ax.set_title("SmolLM2-135M-Instruct 4-bit recipes: size vs quality", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
