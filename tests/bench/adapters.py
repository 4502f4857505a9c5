"""Adapter serving figures on SmolLM2: hot-load latency and throughput over many adapters.

1. Hot load to first token: 20 times, load an r=16 adapter (load_inplace) and send a 1-token
   request; p50/p90 of the load call and of load-start to first token.
2. Throughput: 16 concurrent 128-token requests spread over 8 distinct adapters vs the same load on
   one adapter (and on the bare base), alternated twice; the ratio 8-adapters / 1-adapter.

    python -m tests.bench.adapters [--out results/bench_adapters.json]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.server_arg import serving  # noqa: E402
from bench.output import write_result  # noqa: E402

ADMIN = {"authorization": "Bearer bench-admin"}
MODEL = "smollm2-135m-instruct"


def make_adapters(base_dir: Path, root: Path, count: int, rank: int) -> list[str]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    names = []
    for i in range(count):
        torch.manual_seed(i)
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False, task_type="CAUSAL_LM",
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        model = get_peft_model(base, cfg)
        with torch.no_grad():  # small deltas: the adapters change outputs without wrecking them
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.mul_(0.01)
        name = f"bench-{i}"
        model.save_pretrained(root / name, safe_serialization=True)
        names.append(name)
    return names


def hot_load(base_url: str, root: Path, name: str, loads: int) -> dict:
    load_ms, first_ms = [], []
    with httpx.Client(base_url=base_url, timeout=120) as http:
        http.post("/v1/load_lora_adapter", json={"lora_name": "hot", "lora_path": str(root / name)}, headers=ADMIN)
        for _ in range(loads):
            t0 = time.perf_counter()
            r = http.post("/v1/load_lora_adapter", headers=ADMIN,
                          json={"lora_name": "hot", "lora_path": str(root / name), "load_inplace": True})
            r.raise_for_status()
            t1 = time.perf_counter()
            http.post("/v1/completions", json={"model": "hot", "prompt": "Hello", "max_tokens": 1}).raise_for_status()
            t2 = time.perf_counter()
            load_ms.append((t1 - t0) * 1000)
            first_ms.append((t2 - t0) * 1000)

    def pct(xs, q):
        return round(statistics.quantiles(xs, n=10)[q - 1] if len(xs) >= 10 else max(xs), 1)

    return {"loads": loads, "load_p50_ms": round(statistics.median(load_ms), 1), "load_p90_ms": pct(load_ms, 9),
            "load_to_first_token_p50_ms": round(statistics.median(first_ms), 1),
            "load_to_first_token_p90_ms": pct(first_ms, 9)}


async def spread(base_url: str, models: list[str], n: int, max_tokens: int) -> dict:
    """n concurrent requests, request i on models[i % len(models)]."""
    import openai

    from bench.concurrency import PROMPTS, one

    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="bench", max_retries=0, timeout=600)
    start = time.perf_counter()
    results = await asyncio.gather(*[one(client, models[i % len(models)], PROMPTS[i % len(PROMPTS)], max_tokens)
                                     for i in range(n)])
    wall = time.perf_counter() - start
    await client.close()
    tokens = sum(r["tokens"] for r in results)
    return {"models": len(models), "output_tokens_per_s": round(tokens / wall, 2), "wall_s": round(wall, 2),
            "ttft_p50_s": round(statistics.median(r["ttft"] for r in results), 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--loads", type=int, default=20)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path("results/bench_adapters.json"))
    args = ap.parse_args(argv)

    from server.default_model import default_model_dir

    base_dir = default_model_dir(Path.home() / ".cache" / "slimserve")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = make_adapters(base_dir, root, 8, args.rank)
        with serving(["--adapter-root", str(root), "--admin-key", "bench-admin", "--max-loras", "16"],
                     Path("/tmp/slimserve-bench-adapters.log")) as server:
            url = server.base_url
            hot = hot_load(url, root, names[0], args.loads)
            asyncio.run(spread(url, names, 8, 4))  # warm-up, and just-in-time loads of all eight
            rounds = []
            for _ in range(2):  # alternate, so drift hits both sides alike
                rounds.append({
                    "base": asyncio.run(spread(url, [MODEL], args.n, args.max_tokens)),
                    "one_adapter": asyncio.run(spread(url, names[:1], args.n, args.max_tokens)),
                    "eight_adapters": asyncio.run(spread(url, names, args.n, args.max_tokens)),
                })

    def mean(key):
        return round(statistics.mean(r[key]["output_tokens_per_s"] for r in rounds), 2)

    result = {"rank": args.rank, "hot_load": hot, "rounds": rounds,
              "tok_s": {"base": mean("base"), "one_adapter": mean("one_adapter"),
                        "eight_adapters": mean("eight_adapters")}}
    result["eight_vs_one"] = round(result["tok_s"]["eight_adapters"] / result["tok_s"]["one_adapter"], 3)
    result["one_adapter_vs_base"] = round(result["tok_s"]["one_adapter"] / result["tok_s"]["base"], 3)
    print(f"hot load (r={args.rank}, {args.loads}x): load p50 {hot['load_p50_ms']} ms, "
          f"load->first token p50 {hot['load_to_first_token_p50_ms']} ms (p90 {hot['load_to_first_token_p90_ms']})")
    print(f"{args.n} concurrent x {args.max_tokens} tokens: base {result['tok_s']['base']} tok/s, one adapter "
          f"{result['tok_s']['one_adapter']}, eight adapters {result['tok_s']['eight_adapters']} "
          f"-> 8/1 = {result['eight_vs_one']}x, 1/base = {result['one_adapter_vs_base']}x")
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
