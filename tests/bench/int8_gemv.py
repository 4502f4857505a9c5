"""slimserve's own int8 decode kernel (server/engines/torch/int8_gemv.py) against torch's
`aten._weight_int8pack_mm`, in process, on SmolLM2-135M's decode shapes (q/k/v and gate/up fused), with
30 copies of each layer so the weights stream from memory as in a real step, not from cache.

    python -m tests.bench.int8_gemv [--rows 1,2,4,8,16] [--reps 15]

Prints and writes, per row count: the time of the 120 layer matmuls of a step with each kernel
(median of --reps) and the ratio; the crossover sets int8_gemv.MAX_ROWS. Writes
tests/bench/figures/int8_gemv_smollm2.json and .png with the CPU (lscpu).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from server.engines.torch import int8_gemv
from server.engines.torch.int8_linear import quantize_int8_per_channel
from tests.bench.machine import describe, summary
from tests.bench.output import pyplot, save_figure, write_result

FIGURES = Path(__file__).parent / "figures"
SHAPES = [("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536)]  # (out, in)


def layers(dtype: torch.dtype, copies: int = 30) -> list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(copies):
        for _, n, k in SHAPES:
            q, scales = quantize_int8_per_channel(torch.randn(n, k, generator=gen) * 0.02)
            stored = scales.to(dtype)
            out.append((k, q, stored, stored.float()))
    return out


def step_ms(fn, layers_, xs, reps: int) -> float:
    for _ in range(3):
        for k, q, s, s32 in layers_:
            fn(xs[k], q, s, s32)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for k, q, s, s32 in layers_:
            fn(xs[k], q, s, s32)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    rows = [r["rows"] for r in result["levels"]]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(rows, [r["torch_ms"] for r in result["levels"]], "o-", label="aten._weight_int8pack_mm")
    ax.plot(rows, [r["own_ms"] for r in result["levels"]], "o-", label="slimserve int8_gemv")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rows")
    ax.set_ylabel("ms for a step's 120 layer matmuls")
    ax.set_title(f"SmolLM2 decode shapes, int8 weights, {result['dtype']} activations")
    ax.legend()
    save_figure(fig, path, footer=summary(result["cpu"]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,2,4,8,16")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", type=Path, default=FIGURES / "int8_gemv_smollm2.json")
    args = ap.parse_args(argv)
    if not int8_gemv.available():
        raise SystemExit(f"the kernel is not built here: {int8_gemv.why_not()}")
    dtype = getattr(torch, args.dtype)
    cpu = describe()
    print(f"CPU: {summary(cpu)}; {torch.get_num_threads()} thread(s), {args.dtype} activations", flush=True)
    weights = layers(dtype)
    levels = []
    with torch.inference_mode():
        for rows in [int(r) for r in args.rows.split(",")]:
            xs = {k: torch.randn(rows, k).to(dtype) for k in {s[2] for s in SHAPES}}
            torch_kernel = lambda x, q, s, s32: torch.ops.aten._weight_int8pack_mm(x, q, s)  # noqa: E731
            own_kernel = lambda x, q, s, s32: int8_gemv.gemv(x, q, s32, None)  # noqa: E731
            aten, own = [], []
            for _ in range(2):  # turns: torch, own, torch, own; the best of each
                aten.append(step_ms(torch_kernel, weights, xs, args.reps))
                own.append(step_ms(own_kernel, weights, xs, args.reps))
            aten, own = min(aten), min(own)
            streamed = sum(q.numel() for _, q, _, _ in weights) / 1e6
            level = {"rows": rows, "torch_ms": round(aten, 3), "own_ms": round(own, 3),
                     "speedup": round(aten / own, 2), "own_gb_s": round(streamed / own, 1),
                     "torch_gb_s": round(streamed / aten, 1)}
            levels.append(level)
            print(f"{rows:>3} row(s): torch {aten:6.2f} ms ({level['torch_gb_s']} GB/s), own {own:6.2f} ms "
                  f"({level['own_gb_s']} GB/s): {level['speedup']:.2f}x", flush=True)
    result = {"cpu": cpu, "torch": torch.__version__, "dtype": args.dtype, "threads": torch.get_num_threads(),
              "max_rows": int8_gemv.MAX_ROWS, "levels": levels,
              "load_avg_at_end": [round(x, 2) for x in __import__("os").getloadavg()],
              "command": f"python -m tests.bench.int8_gemv --rows {args.rows} --dtype {args.dtype} --reps {args.reps}"}
    write_result(result, args.out, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
