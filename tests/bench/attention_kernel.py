"""slimserve's decode attention kernel (server/engines/torch/decode_attention.py) against the matmul path it
replaces in the compiled decode step (DecodeGraph._attention, compiled), side by side in one process:

1. One layer's attention on SmolLM2's head shapes (9 query heads, 3 key/value heads, dim 64), rows x
   cache lengths, each call on the next of 30 layers' caches so they stream from memory as in a step.
2. The whole compiled decode step of SmolLM2 in process, at 1 and 16 rows, compiled twice (attention by
   the kernel, and by the matmul path), the two taking turns rep by rep, and whether they chose the
   same greedy tokens (bf16: a near tie may flip; fp32 keeps them).

    python -m tests.bench.attention_kernel [--dtype bfloat16] [--rows 1,4,16] [--lengths 64,256,1024]
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python -m tests.bench.attention_kernel --kernel-march x86-64-v3
        # as an AVX2-only CPU runs it: torch dispatching AVX2, the kernel built for AVX2 + FMA

Best of the reps (the machine is shared: the minimum is the speed when the CPU was ours); the medians
are kept too. Writes tests/bench/figures/attention_kernel_smollm2.json and .png with the CPU (lscpu).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
from pathlib import Path

import torch

from server.default_model import DEFAULT_MODEL_ID
from server.engines.torch import decode_attention, native_build
from server.engines.torch.attention import allowed_columns
from server.engines.torch.compiled_decode import CompiledDecode, use_isa_cache_dir
from server.engines.torch.decode_graph import DecodeGraph
from server.engines.torch.engine import TorchEngine
from server.engines.torch.frame_headroom import run_with_headroom
from server.engines.torch.runner import ModelRunner
from tests.bench.compiled_step import run as decode_steps
from tests.bench.machine import describe, summary
from tests.bench.models import local_model
from tests.bench.output import pyplot, save_figure, write_result

FIGURES = Path(__file__).parent / "figures"
HEADS, KV_HEADS, DIM, LAYERS = 9, 3, 64, 30


def _per_call_us(fn, caches, calls: int) -> float:
    turn = itertools.cycle(caches)
    for _ in range(20):
        fn(*next(turn))
    started = time.perf_counter()
    for _ in range(calls):
        fn(*next(turn))
    return (time.perf_counter() - started) / calls * 1e6


def layer_level(rows: int, length: int, dtype: torch.dtype, reps: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(rows, HEADS, 1, DIM, generator=gen).to(dtype)
    mask = torch.ones(rows, length, dtype=torch.bool)
    for r in range(rows):  # left padding, as a batch of prompts of different lengths has
        mask[r, :min(3 * r, length - 1)] = False
    caches = [tuple(torch.randn(rows, KV_HEADS, length + 64, DIM, generator=gen).to(dtype)[:, :, :length]
                    for _ in range(2)) for _ in range(LAYERS)]
    matmuls = torch.compile(lambda q, k, v, m: DecodeGraph._attention(q, k, v, allowed_columns(m, 1), DIM ** -0.5))
    own = lambda k, v: decode_attention.op(q, k, v, mask, DIM ** -0.5)  # noqa: E731
    theirs = lambda k, v: matmuls(q, k, v, mask)  # noqa: E731
    calls = max(50, 20000 // (rows * length // 16 + 1))
    kernel, matmul = [], []
    with torch.inference_mode():
        for _ in range(reps):
            kernel.append(_per_call_us(own, caches, calls))
            matmul.append(_per_call_us(theirs, caches, calls))
    return {"rows": rows, "length": length, "kernel_us": round(min(kernel), 1), "matmul_us": round(min(matmul), 1),
            "kernel_us_median": round(statistics.median(kernel), 1),
            "matmul_us_median": round(statistics.median(matmul), 1), "speedup": round(min(matmul) / min(kernel), 2)}


def step_level(path: str, dtype: str, rows_list: list[int], steps: int, reps: int) -> dict:
    engine = TorchEngine.load("bench", path, dtype=dtype)
    graphs, compile_s = {}, {}
    for name, on in (("kernel", True), ("matmul", False)):
        decode_attention.enabled = on  # read when the graph is built
        graphs[name] = CompiledDecode(engine.model)
        compile_s[name] = round(graphs[name].warm_up(ModelRunner(engine.model, torch.device("cpu"), 0)), 1)
        assert graphs[name].graph.own_attention == on
        print(f"compiled the step with attention by the {name} path in {compile_s[name]:.0f} s", flush=True)
    decode_attention.enabled = True
    levels = []
    for rows in rows_list:
        ms = {name: [] for name in graphs}
        tokens = {}
        for _ in range(reps):
            for name, compiled in graphs.items():
                took, tokens[name] = run_with_headroom(lambda: decode_steps(engine.model, compiled, rows, steps, True))
                ms[name].append(took)
        same = tokens["kernel"] == tokens["matmul"]
        first = next((i for i, (a, b) in enumerate(zip(tokens["kernel"], tokens["matmul"])) if a != b), None)
        level = {"rows": rows, **{f"{n}_ms": round(min(v), 2) for n, v in ms.items()},
                 **{f"{n}_ms_median": round(statistics.median(v), 2) for n, v in ms.items()},
                 **{f"{n}_tok_s": round(rows * 1e3 / min(v), 1) for n, v in ms.items()},
                 "speedup": round(min(ms["matmul"]) / min(ms["kernel"]), 2), "same_greedy_tokens": same,
                 "first_different_step": first}
        levels.append(level)
        print(f"step, {rows:>2} row(s): kernel {level['kernel_ms']:6.2f} ms, matmul path {level['matmul_ms']:6.2f} ms "
              f"({level['speedup']:.2f}x); same greedy tokens over {steps} steps: {same}", flush=True)
    for compiled in graphs.values():
        assert compiled.failures == 0, compiled.last_error
    return {"compile_s": compile_s, "levels": levels}


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    layers = result["layer"]
    labels = [f"{r['rows']}x{r['length']}" for r in layers]
    x = range(len(labels))
    left.bar([i - 0.2 for i in x], [r["matmul_us"] for r in layers], 0.4, label="matmul path (compiled)")
    left.bar([i + 0.2 for i in x], [r["kernel_us"] for r in layers], 0.4, label="slimserve kernel")
    left.set_xticks(list(x), labels, rotation=45, fontsize=7)
    left.set_xlabel("rows x cached positions")
    left.set_ylabel("us per layer (caches streamed)")
    left.legend(fontsize=7)
    steps = result["step"]["levels"]
    x = range(len(steps))
    right.bar([i - 0.2 for i in x], [r["matmul_tok_s"] for r in steps], 0.4, label="matmul path")
    right.bar([i + 0.2 for i in x], [r["kernel_tok_s"] for r in steps], 0.4, label="slimserve kernel")
    right.set_xticks(list(x), [f"{r['rows']} row(s)" for r in steps])
    right.set_ylabel("compiled decode tok/s (in process)")
    right.legend(fontsize=7)
    fig.suptitle(f"SmolLM2 {result['dtype']}: decode attention, kernel vs matmul path")
    save_figure(fig, path, footer=summary(result["cpu"]) + "\n" + result["command"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT_MODEL_ID)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--rows", default="1,4,16")
    ap.add_argument("--lengths", default="64,256,1024")
    ap.add_argument("--step-rows", default="1,16")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--kernel-march", default="native", help="the kernel's -march (x86-64-v3: an AVX2-only CPU's)")
    ap.add_argument("--out", type=Path, default=FIGURES / "attention_kernel_smollm2.json")
    args = ap.parse_args(argv)
    native_build.FLAGS = [f"-march={args.kernel_march}" if f.startswith("-march=") else f for f in native_build.FLAGS]
    if decode_attention.off_reason() is not None:
        raise SystemExit(f"the kernel does not run here: {decode_attention.off_reason()}")
    use_isa_cache_dir()  # inductor's cache per vector ISA (the layer-level matmul path compiles too)
    cpu = describe()
    dtype = getattr(torch, args.dtype)
    print(f"CPU: {summary(cpu)}; {torch.get_num_threads()} thread(s), {args.dtype}", flush=True)
    layer = []
    for rows in [int(r) for r in args.rows.split(",")]:
        for length in [int(n) for n in args.lengths.split(",")]:
            level = layer_level(rows, length, dtype, args.reps)
            layer.append(level)
            print(f"layer, {rows:>2} row(s) x {length:>4}: kernel {level['kernel_us']:7.1f} us, matmul path "
                  f"{level['matmul_us']:7.1f} us ({level['speedup']:.2f}x)", flush=True)
    step = step_level(local_model(args.model), args.dtype, [int(r) for r in args.step_rows.split(",")], args.steps,
                      args.reps)
    env = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ}
    result = {"model": args.model, "cpu": cpu, "env": env, "kernel_march": args.kernel_march,
              "torch": torch.__version__, "dtype": args.dtype,
              "threads": torch.get_num_threads(), "layer": layer, "step": step,
              "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
              "command": " ".join(f"{k}={v}" for k, v in env.items()) + (" " if env else "") +
                         f"python -m tests.bench.attention_kernel --dtype {args.dtype} --rows {args.rows} "
                         f"--lengths {args.lengths} --step-rows {args.step_rows} --steps {args.steps} "
                         f"--reps {args.reps} --kernel-march {args.kernel_march}"}
    write_result(result, args.out, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
