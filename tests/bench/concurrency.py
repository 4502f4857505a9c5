"""Concurrent vs sequential throughput of a slimserve server (the foundation's benchmark).

Sends N concurrent, then N sequential, streamed requests of `--max-tokens` tokens each (EOS ignored,
so every request generates the same count) and prints aggregate output tokens/s, TTFT p50 and the
server's peak resident memory. Starts its own server on the embedded SmolLM2 unless --base-url is given.

    python -m tests.bench.concurrency [--base-url URL --model M] [--n 16] [--max-tokens 128] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.server_arg import add_server_args, serving  # noqa: E402
from bench.output import write_result  # noqa: E402

PROMPTS = [
    "Explain why the sky is blue.", "Write a short poem about the sea.", "What is a neural network?",
    "Give three tips for learning a language.", "Describe the water cycle.", "Why do cats purr?",
    "Summarise the plot of Hamlet.", "How does a bicycle stay upright?", "What is inflation?",
    "List some uses of copper.", "How do vaccines work?", "What causes the seasons?",
    "Describe a good breakfast.", "What is the speed of light?", "How are mountains formed?",
    "Why is exercise healthy?",
]


async def one(client: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    first = None
    tokens = 0
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter()
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return {"ttft": (first or time.perf_counter()) - start, "latency": time.perf_counter() - start, "tokens": tokens}


async def run_phase(base_url: str, model: str, n: int, max_tokens: int, concurrent: bool) -> dict:
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="bench", max_retries=0, timeout=600)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    start = time.perf_counter()
    if concurrent:
        results = await asyncio.gather(*[one(client, model, p, max_tokens) for p in prompts])
    else:
        results = [await one(client, model, p, max_tokens) for p in prompts]
    wall = time.perf_counter() - start
    await client.close()
    tokens = sum(r["tokens"] for r in results)
    return {
        "mode": "concurrent" if concurrent else "sequential",
        "requests": n,
        "output_tokens": tokens,
        "wall_s": round(wall, 3),
        "output_tokens_per_s": round(tokens / wall, 2),
        "ttft_p50_s": round(statistics.median(r["ttft"] for r in results), 4),
        "latency_p50_s": round(statistics.median(r["latency"] for r in results), 3),
    }


class PeakRSS:
    """Samples a process's resident memory in the background."""

    def __init__(self, pid: int | None):
        self.proc = psutil.Process(pid) if pid else None
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set() and self.proc:
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path("results/bench_concurrency.json"))
    add_server_args(ap)
    args = ap.parse_args(argv)

    with serving(args.server_arg, Path("/tmp/slimserve-bench.log"), base_url=args.base_url) as server:
        httpx.get(server.base_url + "/health", timeout=10).raise_for_status()
        asyncio.run(run_phase(server.base_url, args.model, 2, 8, True))  # warm-up
        with PeakRSS(server.pid) as rss:
            concurrent = asyncio.run(run_phase(server.base_url, args.model, args.n, args.max_tokens, True))
            sequential = asyncio.run(run_phase(server.base_url, args.model, args.n, args.max_tokens, False))
    result = {
        "model": args.model,
        "max_tokens": args.max_tokens,
        "concurrent": concurrent,
        "sequential": sequential,
        "speedup": round(concurrent["output_tokens_per_s"] / sequential["output_tokens_per_s"], 2),
        "peak_rss_mib": round(rss.peak / 2**20, 1) if server.pid else None,
        "cpu_count": psutil.cpu_count(),
    }
    for phase in (concurrent, sequential):
        print(f"{phase['mode']:>10}: {phase['output_tokens_per_s']:8.1f} output tok/s  "
              f"TTFT p50 {phase['ttft_p50_s'] * 1000:7.1f} ms  ({phase['requests']} x {args.max_tokens} tokens, "
              f"{phase['wall_s']} s)")
    print(f"speedup concurrent/sequential: {result['speedup']}x   peak RSS: {result['peak_rss_mib']} MiB")
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
