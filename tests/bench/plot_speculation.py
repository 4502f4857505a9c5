"""One chart of the speculation bench's runs side by side: speed-up over the plain server per prompt set
and concurrency, one bar per speculative_config (each run against its own plain server, as measured).

    python -m tests.bench.plot_speculation tests/bench/figures/prompt_lookup_packed_smollm2.json \
        tests/bench/figures/self_speculation_int4_final_smollm2.json \
        tests/bench/figures/self_speculation_lookup_int4_smollm2.json --out tests/bench/figures/speculation_methods_smollm2.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tests.bench.machine import summary


def label(config: dict) -> str:
    method = config.get("method")
    if method == "quantized_self":
        copy = f"{config.get('quantization', 'int4')} copy"
        return f"lookup, then {copy}" if "prompt_lookup_max" in config else copy
    return "prompt lookup" if method == "ngram" else str(method)


def main(argv: list[str] | None = None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = argparse.ArgumentParser()
    ap.add_argument("runs", type=Path, nargs="+", help="JSON files written by tests.bench.prompt_lookup")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    results = [json.loads(p.read_text()) for p in args.runs]
    groups = sorted({(r["prompts"], r["concurrency"]) for res in results for r in res["runs"]},
                    key=lambda g: (g[1], g[0]))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(results)
    for i, res in enumerate(results):
        by_group = {(r["prompts"], r["concurrency"]): r["speedup"] for r in res["runs"]}
        xs = [g + i * width for g in range(len(groups)) if groups[g] in by_group]
        ys = [by_group[g] for g in groups if g in by_group]
        bars = ax.bar(xs, ys, width, label=label(res["speculative_config"]))
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], [f"{p}\nc={c}" for p, c in groups])
    ax.axhline(1.0, c="grey", lw=0.5)
    ax.axhline(1.3, ls="--", c="tab:blue", lw=1)
    ax.set_ylabel("tok/s with speculation / without")
    cpu = results[0].get("cpu")
    ax.set_title(f"Speculation on the PyTorch engine, {Path(results[0]['model']).name}, {results[0]['dtype']}, "
                 f"greedy\n{summary(cpu) if cpu else ''}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
