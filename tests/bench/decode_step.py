"""Where a batch-1 decode step of the PyTorch engine goes, with and without oneDNN-prepacked linears:
the whole step (the model's forward on one new token over its own KV) against its linear layers
called alone on one-row inputs, and each distinct linear shape timed both ways.

    OMP_NUM_THREADS=1 python -m tests.bench.decode_step [--dtype bfloat16] [--threads 1]

Fastest of 5 x 8 steps (the machine is shared: the minimum is the speed when the CPU was ours).
Writes tests/bench/figures/decode_step_smollm2.json with the CPU (lscpu).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from server.default_model import DEFAULT_MODEL_ID
from server.engines.torch.engine import TorchEngine
from server.engines.torch.onednn_linear import OneDNNLinear
from tests.bench.models import local_model
from tests.bench.machine import describe, summary
from tests.bench.output import write_result

FIGURES = Path(__file__).parent / "figures"
PROMPT = "Write a short story about a robot who learns to paint. Once upon a time"


def fastest(fn, rounds: int = 5, inner: int = 8) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def step_split(engine: TorchEngine) -> dict:
    model = engine.model
    ids = torch.tensor([engine.encode(PROMPT)])
    with torch.no_grad():
        out = model(ids, use_cache=True)
        state = {"past": out.past_key_values, "next": out.logits[:, -1:].argmax(-1)}

        def step():
            o = model(state["next"], past_key_values=state["past"], use_cache=True)
            state["past"], state["next"] = o.past_key_values, o.logits[:, -1:].argmax(-1)

        step_s = fastest(step)
        linears = [m for m in model.modules() if isinstance(m, (nn.Linear, OneDNNLinear))]
        dtype = engine.dtype_choice.dtype
        xs = [torch.randn(1, 1, m.in_features).to(dtype) for m in linears]
        linear_s = fastest(lambda: [m(x) for m, x in zip(linears, xs)])
    return {"step_ms": step_s * 1e3, "tok_s": 1 / step_s, "linears": len(linears), "linears_ms": linear_s * 1e3,
            "linear_share": linear_s / step_s, "linear_kernel": engine.linear_kernel}


def per_shape(engine: TorchEngine, rows: tuple[int, ...] = (1, 16)) -> list[dict]:
    dtype = engine.dtype_choice.dtype
    shapes = sorted({(m.out_features, m.in_features) for m in engine.model.modules() if isinstance(m, nn.Linear)})
    out = []
    with torch.no_grad():
        for n, k in shapes:
            linear = nn.Linear(k, n, bias=False, dtype=dtype)
            packed = OneDNNLinear.from_linear(linear)
            for m in rows:
                x = torch.randn(m, k).to(dtype)
                plain_s, packed_s = fastest(lambda: linear(x)), fastest(lambda: packed(x))
                out.append({"out": n, "in": k, "rows": m, "nn_linear_us": plain_s * 1e6,
                            "prepacked_us": packed_s * 1e6, "gain": plain_s / packed_s})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT_MODEL_ID)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=FIGURES / "decode_step_smollm2.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = local_model(args.model)
    cpu = describe()
    print(f"CPU: {summary(cpu)}; {args.threads} thread(s), {args.dtype}")
    result = {"model": path, "cpu": cpu, "torch": torch.__version__, "dtype": args.dtype, "threads": args.threads,
              "command": f"python -m tests.bench.decode_step --dtype {args.dtype} --threads {args.threads}"}
    plain = TorchEngine.load("plain", path, dtype=args.dtype, prepack_weights=False)
    result["per_shape"] = per_shape(plain)
    for row in result["per_shape"]:
        print(f"  {row['out']:>6}x{row['in']:<5} rows {row['rows']:>3}: nn.Linear {row['nn_linear_us']:8.1f} us, "
              f"prepacked {row['prepacked_us']:8.1f} us, {row['gain']:.2f}x")
    result["nn_linear"] = step_split(plain)
    del plain
    result["prepacked"] = step_split(TorchEngine.load("prepacked", path, dtype=args.dtype))
    for name in ("nn_linear", "prepacked"):
        r = result[name]
        print(f"{name:<10} step {r['step_ms']:6.1f} ms ({r['tok_s']:5.1f} tok/s); {r['linears']} linears alone "
              f"{r['linears_ms']:6.1f} ms = {r['linear_share']:.0%}")
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
