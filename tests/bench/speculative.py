"""Speculative decoding speed-up: the teacher alone vs the teacher with the distilled student as its
draft, in the PyTorch engine, same greedy requests one at a time (the case speculation is for); each
draft setting twice: through the draft always, and adaptive (the engine's default: the draft only
while it measures faster than the plain path, speculation_judge.py).

    python -m tests.bench.speculative --teacher smollm2-135m-instruct --draft /tmp/router/student-kd \
        --prompts /tmp/router/heldout.jsonl

Alternates the two engines prompt by prompt (this machine is noisy) and checks the texts match.
Writes tests/bench/figures/speculative_smollm2.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from tqdm import tqdm

from compress.router_calibration import prompts_of
from server.default_model import DEFAULT_MODEL_ID
from server.engines.base import GenerationRequest, RequestStats, SamplingParams
from server.engines.torch.engine import TorchEngine
from tests.bench.models import local_model
from tests.bench.output import write_result

FIGURES = Path(__file__).parent / "figures"


async def one(engine: TorchEngine, prompt: str, max_tokens: int) -> tuple[str, int, float]:
    ids = engine.render_chat([{"role": "user", "content": prompt}], True)
    req = GenerationRequest(f"r{time.monotonic_ns()}", ids, SamplingParams(max_tokens=max_tokens, temperature=0.0),
                            RequestStats("bench"))
    t0 = time.perf_counter()
    text, n = "", 0
    async for chunk in engine.generate(req):
        text += chunk.text
        n += len(chunk.token_ids)
    return text, n, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default=DEFAULT_MODEL_ID)
    ap.add_argument("--draft", required=True)
    ap.add_argument("--prompts", type=Path, required=True)
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--speculative-tokens", default="3,5")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", type=Path, default=FIGURES / "speculative_smollm2.json")
    args = ap.parse_args(argv)
    teacher = local_model(args.teacher)
    prompts = prompts_of(args.prompts)[: args.num_prompts]
    ks = [int(k) for k in args.speculative_tokens.split(",")]
    plain = TorchEngine.load("teacher", teacher, dtype=args.dtype)
    specs = {}  # "k3": the draft for every lone greedy request; "k3-adaptive": only while it measures faster
    for k in ks:
        for adaptive in (False, True):
            name = f"k{k}{'-adaptive' if adaptive else ''}"
            specs[name] = TorchEngine.load("teacher", teacher, dtype=args.dtype)
            specs[name].attach_draft(args.draft, k, adaptive=adaptive)

    async def run() -> dict:
        for e in (plain, *specs.values()):
            await e.start()
        await one(plain, "warm up", 8)
        for e in specs.values():
            await one(e, "warm up", 8)
        rows = {"plain": [], **{name: [] for name in specs}}
        for p in tqdm(prompts, desc="prompts"):
            rows["plain"].append(await one(plain, p, args.max_tokens))
            for name, e in specs.items():
                rows[name].append(await one(e, p, args.max_tokens))
        return rows

    rows = asyncio.run(run())
    base_tokens = sum(n for _, n, _ in rows["plain"])
    base_s = sum(s for _, _, s in rows["plain"])
    result = {"teacher": teacher, "draft": args.draft, "prompts": len(prompts), "max_tokens": args.max_tokens,
              "dtype": args.dtype, "plain_tok_s": base_tokens / base_s, "variants": {}}
    print(f"teacher alone: {base_tokens / base_s:.1f} tok/s over {len(prompts)} prompts")
    for name, engine in specs.items():
        r = rows[name]
        same = sum(a[0] == b[0] for a, b in zip(r, rows["plain"]))
        tokens, seconds = sum(n for _, n, _ in r), sum(s for _, _, s in r)
        speedup = (tokens / seconds) / (base_tokens / base_s)
        judge = engine.speculation_judge
        result["variants"][name] = {
            "num_speculative_tokens": engine.speculative.num_tokens, "adaptive": judge is not None,
            "tok_s": tokens / seconds, "speedup": speedup, "identical_texts": same,
            "requests_through_draft": engine.speculative.requests,
            "judged_draft_speedup": judge.speedup() if judge else None}
        print(f"draft {name}: {tokens / seconds:.1f} tok/s, speed-up {speedup:.2f}x, identical texts {same}/{len(r)}, "
              f"{engine.speculative.requests} requests through the draft")
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
