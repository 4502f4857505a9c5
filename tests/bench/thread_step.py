"""The decode step on the engine's own thread against the main thread, eager and compiled, in one run.

A served engine runs every step on its worker thread; the in-process benches (compiled_step,
int_kernels) run on the main thread. Thread-local state has made the two differ before: idle OpenMP
teams (openmp.py) and CPython's frame-stack chunks (frame_headroom.py; the compiled step ran 13.0 ms
on the engine thread against 9.9 ms on the main thread until the engine thread got its headroom).
This bench says whether they differ now.

    python -m tests.bench.thread_step [--dtype bfloat16] [--rows 1,16] [--steps 64] [--reps 2]

Median step of each rep, best rep reported. Writes tests/bench/figures/thread_step_smollm2.json and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

import torch

from server.default_model import DEFAULT_MODEL_ID
from server.engines.torch.engine import TorchEngine
from server.engines.torch.openmp import release_idle_team
from tests.bench.compiled_step import run
from tests.bench.models import local_model
from tests.bench.machine import describe, summary
from tests.bench.output import pyplot, save_figure, write_result

FIGURES = Path(__file__).parent / "figures"


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    labels = [f"{r['rows']} row(s)\n{r['path']}" for r in result["levels"]]
    width = 0.38
    for i, where in enumerate(("engine", "main")):
        ax.bar([x + (i - 0.5) * width for x in range(len(labels))],
               [r[f"{where}_tok_s"] for r in result["levels"]], width, label=f"{where} thread")
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("decode tok/s (in process)")
    ax.set_title(f"SmolLM2 {result['dtype']}: the step on the engine thread vs the main thread")
    ax.legend()
    save_figure(fig, path, footer=summary(result["cpu"]))


async def measure(engine: TorchEngine, rows: list[int], steps: int, reps: int) -> list[dict]:
    compiled = engine._scheduler.runner.compiled
    paths = ("eager", "compiled") if compiled is not None else ("eager",)
    levels = []
    for n in rows:
        for path in paths:
            best = {"engine": float("inf"), "main": float("inf")}
            for _ in range(reps):
                for where in ("engine", "main"):
                    def step_ms(n=n, path=path):
                        return run(engine.model, compiled, n, steps, path == "compiled")[0]
                    if where == "engine":
                        ms = await asyncio.wrap_future(engine._scheduler.call(step_ms))
                    else:
                        ms = step_ms()
                        release_idle_team()  # the main thread's OpenMP team would slow the engine thread's
                    best[where] = min(best[where], ms)
            level = {"rows": n, "path": path, "engine_ms": round(best["engine"], 2), "main_ms": round(best["main"], 2),
                     "engine_tok_s": round(n * 1e3 / best["engine"], 1), "main_tok_s": round(n * 1e3 / best["main"], 1),
                     "engine_over_main": round(best["engine"] / best["main"], 3)}
            print(f"{n:>3} row(s) {path:>8}: engine thread {level['engine_ms']:6.2f} ms, main thread "
                  f"{level['main_ms']:6.2f} ms ({level['engine_over_main']:.2f}x)", flush=True)
            levels.append(level)
    return levels


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT_MODEL_ID)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--rows", default="1,16")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", type=Path, default=FIGURES / "thread_step_smollm2.json")
    args = ap.parse_args(argv)
    path = local_model(args.model)
    cpu = describe()
    print(f"CPU: {summary(cpu)}; {torch.get_num_threads()} thread(s), {args.dtype}", flush=True)
    engine = TorchEngine.load("bench", path, dtype=args.dtype, compile_decode=not args.no_compile)

    async def go():
        await engine.start()
        try:
            return await measure(engine, [int(r) for r in args.rows.split(",")], args.steps, args.reps)
        finally:
            await engine.shutdown()

    levels = asyncio.run(go())
    result = {"model": path, "cpu": cpu, "torch": torch.__version__, "dtype": args.dtype,
              "threads": torch.get_num_threads(), "decode_step": engine.decode_step, "levels": levels,
              "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
              "command": f"python -m tests.bench.thread_step --dtype {args.dtype} --rows {args.rows} "
                         f"--steps {args.steps} --reps {args.reps}" + (" --no-compile" if args.no_compile else "")}
    write_result(result, args.out, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
