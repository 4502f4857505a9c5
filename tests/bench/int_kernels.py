"""Decode speed of the PyTorch engine's linear kernels, at batch 1 and 8, in process: full precision on
oneDNN-prepacked weights with q/k/v and gate/up fused (the default), prepacked but not fused
(`-unfused`) and on plain nn.Linear (`-eager`), load-time int8/int4 on torch's
packed kernels (fused the same way, or `-unfused`), and the older torchao / bitsandbytes path. A
`-compiled` suffix runs the variant with `compile_decode` (compiled_decode.py), e.g. `int8-compiled`;
its "x fp" ratio is then against the best compiled full-precision variant in the run. A `-torchkernel`
suffix (before `-compiled`) runs int8 on torch's `_weight_int8pack_mm` at every row count instead of
slimserve's own few-row kernel (int8_gemv.py), switched per turn in the same process.

    python -m tests.bench.int_kernels                 # SmolLM2-135M-Instruct, the embedded default
    python -m tests.bench.int_kernels --profile       # plus the top ops of a batch-1 decode per variant

Variants take turns rep by rep (the machine is shared and noisy: other jobs come and go within a
run); the best rep is the headline figure (the speed when the CPU was ours), the median is kept too.
Decode tok/s counts the tokens after each request's first one, over the time from the last
first token to the last token. Writes tests/bench/figures/int_kernels_smollm2.json and .png,
with the CPU model (lscpu) and the flags that matter.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
from pathlib import Path

import torch

from server.default_model import DEFAULT_MODEL_ID
from server.engines.base import GenerationRequest, RequestStats, SamplingParams
from server.engines.torch import int8_gemv
from server.engines.torch.engine import TorchEngine
from tests.bench.models import local_model
from tests.bench.machine import describe, summary
from tests.bench.output import write_result

FIGURES = Path(__file__).parent / "figures"
PROMPT = "Write a short story about a robot who learns to paint. Once upon a time"
VARIANTS = ("fp32", "bf16", "fp32-unfused", "bf16-unfused", "fp32-eager", "bf16-eager", "int8", "int4",
            "int8-torchao", "int4-bnb")
FULL = {"fp32": "float32", "bf16": "bfloat16"}


@contextlib.contextmanager
def int8_kernel_for(variant: str):
    """slimserve's int8 decode kernel off while a `-torchkernel` variant loads and runs (int8_gemv.enabled is
    read on every call, and at load for an fp32 model's head), as it was afterwards."""
    own, int8_gemv.enabled = int8_gemv.enabled, int8_gemv.enabled and "-torchkernel" not in variant
    try:
        yield
    finally:
        int8_gemv.enabled = own


def load(variant: str, path: str) -> TorchEngine:
    base = variant.removesuffix("-compiled").replace("-torchkernel", "")
    if variant.endswith("-compiled"):
        return load_engine(variant, base, path, compile_decode=True)
    return load_engine(variant, base, path)


def load_engine(name: str, variant: str, path: str, **options) -> TorchEngine:
    if variant in FULL:  # linears on oneDNN-prepacked weights where that measured faster (engine default)
        return TorchEngine.load(name, path, dtype=FULL[variant], **options)
    if variant.endswith("-unfused"):  # q/k/v and gate/up as separate matmuls (fused_projections.py)
        from server.engines.torch import fused_projections

        groups, fused_projections.GROUPS = fused_projections.GROUPS, ()
        try:
            return load_engine(name, variant.removesuffix("-unfused"), path, **options)
        finally:
            fused_projections.GROUPS = groups
    if variant.endswith("-eager"):  # plain nn.Linear, as before #19 item 2
        return TorchEngine.load(name, path, dtype=FULL[variant.removesuffix("-eager")], prepack_weights=False,
                                **options)
    if variant in ("int8", "int4"):
        return TorchEngine.load(name, path, dtype="auto", quantization=variant, **options)
    # the old path, as TorchEngine.load ran it before: a transformers quantization_config
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.load_time import load_time_config
    from server.engines.torch.dtype_choice import choose_dtype

    choice = choose_dtype("auto", None, torch.device("cpu"))
    method = "int8" if variant == "int8-torchao" else "int4"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=choice.dtype, device_map="cpu",
                                                 quantization_config=load_time_config(method, choice.dtype)).eval()
    return TorchEngine(variant, model, AutoTokenizer.from_pretrained(path), max_model_len=2048, max_num_seqs=32,
                       max_prefill_tokens=8192, device=torch.device("cpu"), source=path, quantization=method,
                       dtype_choice=choice)


async def decode_rate(engine: TorchEngine, batch: int, max_tokens: int) -> tuple[float, list[int]]:
    firsts, lasts, counts, first_ids = [], [], [], []

    async def one(i: int) -> None:
        ids = engine.render_chat([{"role": "user", "content": f"{PROMPT} ({i})"}], True)
        req = GenerationRequest(f"b{batch}-{i}-{time.monotonic_ns()}", ids,
                                SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                                RequestStats("bench"))
        first, n, toks = None, 0, []
        async for chunk in engine.generate(req):
            if chunk.token_ids:
                first = first or time.perf_counter()
                n += len(chunk.token_ids)
                toks.extend(chunk.token_ids)
        firsts.append(first)
        lasts.append(time.perf_counter())
        counts.append(n - 1)
        if i == 0:
            first_ids.extend(toks)

    await asyncio.gather(*[one(i) for i in range(batch)])
    return sum(counts) / (max(lasts) - max(firsts)), first_ids


def profile_decode(engine: TorchEngine, steps: int = 8, top: int = 8) -> list[dict]:
    """Top ops (self CPU time) of `steps` batch-1 decode steps through the model with its own cache."""
    from torch.profiler import ProfilerActivity, profile

    model = engine.model
    ids = torch.tensor([engine.encode(PROMPT)])
    with torch.no_grad():
        out = model(ids, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                out = model(nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1000 / steps,
             "share": e.self_cpu_time_total / total, "calls_per_step": e.count / steps} for e in events[:top]]


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["variants"])
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(names)), 4.4))
    width = 0.38
    for k, batch in enumerate(result["batches"]):
        vals = [result["variants"][n][f"batch{batch}_tok_s"] for n in names]
        bars = ax.bar([i + (k - 0.5) * width for i in range(len(names))], vals, width, label=f"batch {batch}")
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("decode tok/s")
    ax.set_title(f"SmolLM2-135M decode, PyTorch engine, best of {result['reps']} reps\n"
                 + summary(result["cpu"]), fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT_MODEL_ID)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", type=Path, default=FIGURES / "int_kernels_smollm2.json")
    args = ap.parse_args(argv)
    path = local_model(args.model)
    variants = args.variants.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    cpu = describe()
    print(f"CPU: {summary(cpu)}; flags: {' '.join(cpu['avx512'] + cpu['amx'])}")
    engines = {}
    for v in variants:  # loaded with the kernel as it runs: an fp32 model's head is fp32 only with slimserve's
        with int8_kernel_for(v):
            engines[v] = load(v, path)

    async def run() -> dict:
        rates = {v: {b: [] for b in batches} for v in variants}
        texts = {}
        for e in engines.values():
            await e.start()
            await decode_rate(e, 1, 4)  # warm up
        for rep in range(args.reps):
            for b in batches:
                for v in variants:
                    with int8_kernel_for(v):
                        rate, toks = await decode_rate(engines[v], b, args.max_tokens)
                    rates[v][b].append(rate)
                    texts.setdefault(v, toks)
            print(f"rep {rep + 1}/{args.reps}: " + "  ".join(
                f"{v} " + "/".join(f"{rates[v][b][-1]:.1f}" for b in batches) for v in variants))
        for e in engines.values():
            await e.shutdown()
        return {"rates": rates, "texts": texts}

    out = asyncio.run(run())
    result = {"model": path, "cpu": cpu, "torch": torch.__version__, "batches": batches,
              "max_tokens": args.max_tokens, "reps": args.reps,
              "command": f"python -m tests.bench.int_kernels --variants {args.variants} --batches {args.batches} "
                         f"--max-tokens {args.max_tokens} --reps {args.reps}" + (" --profile" if args.profile else ""),
              "load_avg_at_end": [round(x, 2) for x in __import__("os").getloadavg()], "variants": {}}
    for v in variants:
        e = engines[v]
        row = {"dtype": e.dtype_choice.name, "weight_bytes": e.weight_bytes, "linear_kernel": e.linear_kernel,
               **{f"batch{b}_tok_s": max(out["rates"][v][b]) for b in batches},
               **{f"batch{b}_median_tok_s": statistics.median(out["rates"][v][b]) for b in batches},
               **{f"batch{b}_reps": out["rates"][v][b] for b in batches}}
        ref = out["texts"].get("bf16") or out["texts"].get("fp32")
        if ref:
            same = 0
            for a, c in zip(out["texts"][v], ref):
                if a != c:
                    break
                same += 1
            row["greedy_prefix_same_as_full_precision"] = same
        result["variants"][v] = row
    rows = result["variants"]
    for suffix in ("", "-compiled"):  # each variant against full precision run the same way
        full = [f + suffix for f in FULL if f + suffix in rows]
        if not full:
            continue
        best = max(full, key=lambda f: rows[f]["batch1_tok_s"])
        result["full_precision_best" + suffix.replace("-", "_")] = {"variant": best,
                                                                    "batch1_tok_s": rows[best]["batch1_tok_s"]}
        for v, row in rows.items():
            if v.endswith("-compiled") == bool(suffix):
                row["full_precision_reference"] = best
                row["batch1_x_full_precision"] = row["batch1_tok_s"] / rows[best]["batch1_tok_s"]
                row["batch1_median_x_full_precision"] = row["batch1_median_tok_s"] / max(
                    rows[f]["batch1_median_tok_s"] for f in full)
    if args.profile:
        for v in variants:
            with int8_kernel_for(v):
                result["variants"][v]["profile_batch1"] = profile_decode(engines[v])
    print(f"\nbest of {args.reps} reps (median in brackets)")
    print(f"{'variant':<22}{'dtype':<10}{'MiB':>8}" + "".join(f"{'b' + str(b) + ' tok/s':>18}" for b in batches)
          + f"{'b1 x fp':>14}")
    for v, row in result["variants"].items():
        ratio = (f"{row['batch1_x_full_precision']:>7.2f} ({row['batch1_median_x_full_precision']:.2f})"
                 if "batch1_x_full_precision" in row else "")
        print(f"{v:<22}{row['dtype']:<10}{row['weight_bytes'] / 2**20:>8.1f}"
              + "".join(f"{row[f'batch{b}_tok_s']:>10.1f} ({row[f'batch{b}_median_tok_s']:5.1f})" for b in batches)
              + ratio)
    if args.profile:
        for v in variants:
            print(f"\n{v}: top ops per batch-1 decode step")
            for op in result["variants"][v]["profile_batch1"]:
                print(f"  {op['op']:<42}{op['self_ms_per_step']:>8.2f} ms {op['share']:>6.1%}"
                      f"{op['calls_per_step']:>7.0f} calls")
    write_result(result, args.out, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
