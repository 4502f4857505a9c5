"""One layer's decode attention, transformers' sdpa path (repeat_kv + torch's fused kernel, as our batches
always carry a mask) against the engine's grouped path (server/engines/torch/attention.py), on a model's
head shapes over a left-padded cache, for batch sizes x cache lengths x dtypes.

    python -m tests.bench.attention_step [--threads 2] [--rows 1,4,16] [--lengths 64,256,1024]

Default shapes: SmolLM2-135M (9 query heads, 3 key/value heads, head dim 64; 30 layers, so a decode
step spends 30x the per-layer figure). Both paths take turns; fastest of 7 x 20 calls each (the
machine is shared: the minimum is the speed when the CPU was ours). Writes
tests/bench/figures/attention_step_smollm2.json and .png with the CPU (lscpu).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from server.engines.torch.attention import grouped_attention
from tests.bench.machine import describe, summary
from tests.bench.output import pyplot, save_figure, write_result

FIGURES = Path(__file__).parent / "figures"


class _Layer:
    def __init__(self, groups: int):
        self.num_key_value_groups = groups
        self.is_causal = True
        self.training = False


def inputs(rows: int, length: int, heads: int, kv_heads: int, dim: int, dtype: torch.dtype):
    """A decode step's query over a cache view (capacity beyond `length`, as the engine's SlotLayer holds),
    rows left-padded to different lengths."""
    query = torch.randn(rows, heads, 1, dim).to(dtype)
    key = torch.randn(rows, kv_heads, length + 64, dim).to(dtype)[:, :, :length]
    value = torch.randn(rows, kv_heads, length + 64, dim).to(dtype)[:, :, :length]
    mask = torch.ones(rows, 1, 1, length, dtype=torch.bool)
    for r in range(rows):
        mask[r, ..., : (r * length) // (2 * rows)] = False
    return query, key, value, mask


def fastest_pair(a, b, rounds: int = 7, inner: int = 20) -> tuple[float, float]:
    a(), b()
    best_a = best_b = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(inner):
            a()
        t1 = time.perf_counter()
        for _ in range(inner):
            b()
        t2 = time.perf_counter()
        best_a, best_b = min(best_a, (t1 - t0) / inner), min(best_b, (t2 - t1) / inner)
    return best_a, best_b


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rows", default="1,4,16")
    ap.add_argument("--lengths", default="64,256,1024")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=30, help="to scale a layer's time to a decode step's")
    ap.add_argument("--out", type=Path, default=FIGURES / "attention_step_smollm2.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    layer = _Layer(args.heads // args.kv_heads)
    machine = describe()
    print(summary(machine), flush=True)
    results = []
    with torch.inference_mode():
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            for rows in map(int, args.rows.split(",")):
                for length in map(int, args.lengths.split(",")):
                    q, k, v, m = inputs(rows, length, args.heads, args.kv_heads, args.head_dim, dtype)
                    sdpa, grouped = fastest_pair(lambda: sdpa_attention_forward(layer, q, k, v, m),
                                                 lambda: grouped_attention(layer, q, k, v, m))
                    row = {"dtype": dtype_name, "rows": rows, "cache_len": length, "sdpa_us": sdpa * 1e6,
                           "grouped_us": grouped * 1e6, "speedup": sdpa / grouped,
                           "step_ms_saved": (sdpa - grouped) * args.layers * 1e3}
                    results.append(row)
                    print(f"{dtype_name:9} rows {rows:3} cache {length:5}: sdpa {row['sdpa_us']:8.1f} us, grouped "
                          f"{row['grouped_us']:8.1f} us ({row['speedup']:.2f}x; {row['step_ms_saved']:.1f} ms a "
                          f"{args.layers}-layer step)", flush=True)
    write_result({"machine": machine, "threads": args.threads, "shapes": {"heads": args.heads,
                  "kv_heads": args.kv_heads, "head_dim": args.head_dim, "layers": args.layers},
                  "command": "python -m tests.bench.attention_step " + " ".join(argv or []), "results": results},
                 args.out, plot)
    return 0


def plot(result: dict, path: Path) -> None:
    plt = pyplot()

    rows = result["results"]
    dtypes = sorted({r["dtype"] for r in rows})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        for n in sorted({r["rows"] for r in rows}):
            pts = sorted((r["cache_len"], r["speedup"]) for r in rows if r["dtype"] == dtype and r["rows"] == n)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{n} rows")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("cache length (tokens)")
        ax.set_ylabel("sdpa time / grouped time")
        ax.set_title(f"one layer's decode attention, {dtype}")
        ax.legend()
    fig.suptitle(summary(result["machine"]), fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
