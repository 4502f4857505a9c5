"""The PyTorch engine's decode step eager against compiled (compiled_decode.py), in process, side by side:
the same runner, the same rows (1, 4 and 16, left-padded prompts of different lengths), the two paths
taking turns rep by rep; plus the seconds it took to compile, whether both paths chose the same
greedy tokens (and the first step where they did not), and, for bf16, each path's KL to the fp32 model.

    python -m tests.bench.compiled_step [--dtype bfloat16] [--steps 32] [--reps 3]

Median step time of each rep, best rep reported (the machine is shared: the minimum is the speed when
the CPU was ours; the medians over reps are kept too). Writes tests/bench/figures/compiled_step_smollm2.json
and .png with the CPU (lscpu).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from server.default_model import DEFAULT_MODEL_ID
from server.engines.torch.compiled_decode import CompiledDecode
from server.engines.torch.engine import TorchEngine
from server.engines.torch.frame_headroom import run_with_headroom
from server.engines.torch.runner import ModelRunner
from tests.bench.models import local_model
from tests.bench.machine import describe, summary
from tests.bench.output import pyplot, save_figure, write_result

FIGURES = Path(__file__).parent / "figures"


def prefilled(model, compiled: CompiledDecode | None, rows: int, prompt_len: int):
    """A runner holding `rows` synthetic prompts of prompt_len + 3 * row tokens (call it in inference
    mode): the runner, the prefill's logits and each row's next position."""
    runner = ModelRunner(model, torch.device("cpu"), 0)
    runner.compiled = compiled
    prompts = [[1 + (7 * r + i) % 997 for i in range(prompt_len + 3 * r)] for r in range(rows)]
    logits, new_rows = runner.prefill(prompts)
    runner.join(new_rows)
    return runner, logits, [len(p) for p in prompts]


def run(model, compiled: CompiledDecode, rows: int, steps: int, use_compiled: bool) -> tuple[float, list]:
    """Median ms of `steps` greedy decode steps over `rows` fresh rows, and the tokens chosen."""
    with torch.inference_mode():
        runner, logits, positions = prefilled(model, compiled, rows, 40)
        tokens = logits[:, -1].argmax(-1).tolist()
        times, chosen = [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            logits = runner.decode(tokens, positions, compiled=use_compiled)
            tokens = logits.argmax(-1).tolist()
            times.append(time.perf_counter() - t0)
            chosen.append(tokens)
            positions = [p + 1 for p in positions]
    return statistics.median(times[2:]) * 1e3, chosen


def forced_logits(model, compiled: CompiledDecode | None, steps: int = 24) -> torch.Tensor:
    """fp32 logits of `steps` decode steps over three left-padded rows all fed the same fixed tokens."""
    runner = ModelRunner(model, torch.device("cpu"), 0)
    runner.compiled = compiled
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 20000, (n,), generator=gen).tolist() for n in (40, 17, 29)]
    out = []
    with torch.inference_mode():
        runner.join(runner.prefill(prompts)[1])
        for step in range(steps):
            tokens = torch.randint(3, 20000, (3,), generator=gen).tolist()
            out.append(runner.decode(tokens, [len(p) + step for p in prompts], compiled=compiled is not None).float())
    return torch.stack(out)


def precision(path: str, model, compiled: CompiledDecode) -> dict:
    """KL per position to the fp32 model and top-1 agreement with it, eager and compiled."""
    truth = forced_logits(TorchEngine.load("fp32", path, dtype="float32").model, None)
    out = {}
    for name, logits in (("eager", forced_logits(model, None)), ("compiled", forced_logits(model, compiled))):
        kl = torch.nn.functional.kl_div(logits.log_softmax(-1), truth.log_softmax(-1), log_target=True,
                                        reduction="none").sum(-1).mean()
        out[name] = {"kl_to_fp32": round(float(kl), 5),
                     "top1_agreement": round(float((logits.argmax(-1) == truth.argmax(-1)).float().mean()), 3)}
    return out


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    rows = [r["rows"] for r in result["levels"]]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    width = 0.38
    for i, name in enumerate(("eager", "compiled")):
        ax.bar([x + (i - 0.5) * width for x in range(len(rows))], [r[f"{name}_tok_s"] for r in result["levels"]],
               width, label=name)
    ax.set_xticks(range(len(rows)), [f"{r} row(s)" for r in rows])
    ax.set_ylabel("decode tok/s (in process)")
    ax.set_title(f"SmolLM2 {result['dtype']}: eager vs compiled decode step")
    ax.legend()
    save_figure(fig, path, footer=summary(result["cpu"]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT_MODEL_ID)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--rows", default="1,4,16")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=FIGURES / "compiled_step_smollm2.json")
    args = ap.parse_args(argv)
    path = local_model(args.model)
    cpu = describe()
    print(f"CPU: {summary(cpu)}; {torch.get_num_threads()} thread(s), {args.dtype}", flush=True)
    engine = TorchEngine.load("bench", path, dtype=args.dtype)
    compiled = CompiledDecode(engine.model)
    compile_s = compiled.warm_up(ModelRunner(engine.model, torch.device("cpu"), 0))
    print(f"compiled in {compile_s:.0f} s", flush=True)
    levels = []
    for rows in [int(r) for r in args.rows.split(",")]:
        eager_ms, compiled_ms, same = [], [], True
        for _ in range(args.reps):
            ms, want = run_with_headroom(lambda: run(engine.model, compiled, rows, args.steps, use_compiled=False))
            eager_ms.append(ms)
            ms, got = run_with_headroom(lambda: run(engine.model, compiled, rows, args.steps, use_compiled=True))
            compiled_ms.append(ms)
            same = same and got == want
            first_difference = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        level = {"rows": rows, "eager_ms": round(min(eager_ms), 2), "compiled_ms": round(min(compiled_ms), 2),
                 "eager_ms_median": round(statistics.median(eager_ms), 2),
                 "compiled_ms_median": round(statistics.median(compiled_ms), 2),
                 "eager_tok_s": round(rows * 1e3 / min(eager_ms), 1),
                 "compiled_tok_s": round(rows * 1e3 / min(compiled_ms), 1),
                 "speedup": round(min(eager_ms) / min(compiled_ms), 2), "same_greedy_tokens": same,
                 "first_different_step": first_difference}
        levels.append(level)
        print(f"{rows:>3} row(s): eager {level['eager_ms']:6.2f} ms, compiled {level['compiled_ms']:6.2f} ms "
              f"({level['speedup']:.2f}x); same greedy tokens over {args.steps} steps: {same}", flush=True)
    assert compiled.failures == 0, compiled.last_error
    prec = precision(path, engine.model, compiled) if args.dtype != "float32" else None
    if prec:
        print(f"against the fp32 model over 24 forced steps x 3 rows: {prec}", flush=True)
    result = {"precision_vs_fp32": prec,"model": path, "cpu": cpu, "torch": torch.__version__, "dtype": args.dtype,
              "threads": torch.get_num_threads(), "compile_s": round(compile_s, 1), "levels": levels,
              "load_avg_at_end": [round(x, 2) for x in __import__("os").getloadavg()],
              "command": f"python -m tests.bench.compiled_step --dtype {args.dtype} --rows {args.rows} "
                         f"--steps {args.steps} --reps {args.reps}"}
    write_result(result, args.out, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
