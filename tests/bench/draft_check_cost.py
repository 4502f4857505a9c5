"""What a prompt-lookup draft check costs against a plain decode step, eager and compiled, in process.

A draft check feeds each row w positions (its last token and w - 1 draft tokens); speculation pays only
when the tokens it accepts outweigh that extra cost. At one row a step is bound by reading the weights,
so w positions cost little more than one; at 16 rows on 2 cores the step is compute-bound and each
extra position is paid by every row (the batch's common width). The compiled check feeds each row only
its own draft (packed): `--drafting` measures it at the largest row count, that many rows drafting
`--draft-tokens` each and the others none.

    python -m tests.bench.draft_check_cost [--dtype bfloat16] [--rows 1,16] [--widths 1,2,3,4,5,8] \
        [--drafting 1,4,8,16 --draft-tokens 4]

Median of 7 steps per width (after one untimed) over rows of ~150-token prompts, the check's columns dropped after each step
(as a rejected draft's are), above frame_headroom's frame as the engine thread runs (without it a
graph's linears may each pay a fresh CPython frame chunk, depending on where its `call` lands). Writes tests/bench/figures/draft_check_cost_smollm2.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from server.default_model import DEFAULT_MODEL_ID
from server.engines.torch.compiled_decode import CompiledDecode
from server.engines.torch.engine import TorchEngine
from server.engines.torch.frame_headroom import run_with_headroom
from server.engines.torch.runner import ModelRunner
from tests.bench.compiled_step import prefilled
from tests.bench.models import local_model
from tests.bench.machine import describe, summary
from tests.bench.output import write_result

FIGURES = Path(__file__).parent / "figures"


def step_ms(model, compiled: CompiledDecode, rows: int, widths: list[int], use_compiled: bool) -> dict[int, float]:
    out = {}
    with torch.inference_mode():
        runner, _, positions = prefilled(model, compiled, rows, 150)
        for w in widths:
            times = []
            for i in range(8):  # the first untimed
                started = time.perf_counter()
                if w == 1:
                    runner.decode([5] * rows, positions, compiled=use_compiled)
                else:
                    runner.verify([[5] * w] * rows, positions, compiled=use_compiled)
                runner.settle([1] * rows, w)  # keep one column, as after a rejected draft
                if i:
                    times.append(time.perf_counter() - started)
                positions = [p + 1 for p in positions]
            out[w] = statistics.median(times) * 1e3
    return out


def packed_ms(model, compiled: CompiledDecode, rows: int, plans: dict[str, list[int]]) -> dict[str, float]:
    """Median ms of compiled checks where row i drafts plans[name][i] tokens (0: its last token only),
    and of a plain step ("plain"), taking turns."""
    times: dict[str, list[float]] = {"plain": [], **{name: [] for name in plans}}
    with torch.inference_mode():
        runner, _, positions = prefilled(model, compiled, rows, 150)
        for i in range(8):  # the first untimed
            for name in times:
                started = time.perf_counter()
                if name == "plain":
                    runner.decode([5] * rows, positions)
                else:
                    plan = plans[name]
                    runner.verify([[5] * (1 + n) for n in plan], positions)
                    runner.settle([1] * rows, 1 + max(plan))
                if i:
                    times[name].append(time.perf_counter() - started)
                positions = [p + 1 for p in positions]
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT_MODEL_ID)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--rows", default="1,16")
    ap.add_argument("--widths", default="1,2,3,4,5,8")
    ap.add_argument("--drafting", default="1,4,8,16", help="packed checks: rows drafting (at the largest --rows)")
    ap.add_argument("--draft-tokens", type=int, default=4)
    ap.add_argument("--out", type=Path, default=FIGURES / "draft_check_cost_smollm2.json")
    args = ap.parse_args(argv)
    path = local_model(args.model)
    cpu = describe()
    print(f"CPU: {summary(cpu)}; {torch.get_num_threads()} thread(s), {args.dtype}", flush=True)
    engine = TorchEngine.load("bench", path, dtype=args.dtype)
    compiled = CompiledDecode(engine.model, drafts=True)
    compile_s = compiled.warm_up(ModelRunner(engine.model, torch.device("cpu"), 0))
    widths = [int(w) for w in args.widths.split(",")]
    levels = []
    for rows in [int(r) for r in args.rows.split(",")]:
        for path_name in ("eager", "compiled"):
            ms = run_with_headroom(lambda: step_ms(engine.model, compiled, rows, widths, path_name == "compiled"))
            level = {"rows": rows, "path": path_name, "step_ms": {w: round(v, 2) for w, v in ms.items()},
                     "cost_vs_plain_step": {w: round(v / ms[1], 2) for w, v in ms.items()}}
            print(f"{rows:>3} row(s) {path_name:>8}: " + ", ".join(
                f"w={w} {v:.1f} ms ({v / ms[1]:.2f}x)" for w, v in ms.items()), flush=True)
            levels.append(level)
    rows = max(int(r) for r in args.rows.split(","))
    k = args.draft_tokens
    plans = {"1 row x 1": [1] + [0] * (rows - 1)}
    plans.update({f"{n} row(s) x {k}": [k] * n + [0] * (rows - n) for n in map(int, args.drafting.split(","))})
    ms = run_with_headroom(lambda: packed_ms(engine.model, compiled, rows, plans))
    packed = [{"check": name, "tokens_fed": rows + sum(plans.get(name, [])), "step_ms": round(v, 2),
               "extra_ms_per_draft_token": None if name == "plain" else
               round((v - ms["plain"]) / sum(plans[name]), 3)} for name, v in ms.items()]
    for p in packed:
        print(f"{rows} rows, packed compiled {p['check']:>14}: {p['tokens_fed']:>3} tokens fed, {p['step_ms']:.1f} ms"
              + (f", +{p['extra_ms_per_draft_token']:.2f} ms a draft token" if p["extra_ms_per_draft_token"] else ""),
              flush=True)
    assert compiled.failures == 0 and compiled.draft_failures == 0, compiled.last_error
    result = {"model": path, "cpu": cpu, "torch": torch.__version__, "dtype": args.dtype,
              "threads": torch.get_num_threads(), "compile_s": round(compile_s, 1), "levels": levels,
              "packed": {"rows": rows, "checks": packed},
              "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
              "command": f"python -m tests.bench.draft_check_cost --dtype {args.dtype} --rows {args.rows} "
                         f"--widths {args.widths} --drafting {args.drafting} --draft-tokens {k}"}
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
