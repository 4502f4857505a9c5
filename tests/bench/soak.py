"""Soak: many concurrent streaming clients for minutes; nothing accepted may fail, memory must settle.

Each client loops until the deadline: a streamed chat completion, timed (TTFT, end to end). Every
`--disconnect-every`-th request of a client leaves mid-stream (a long, EOS-ignoring generation closed
after a few events); the engine's aborted-sequences counter must grow by exactly that many, and at
the end nothing may still run or wait. Resident memory is read from the server's own /metrics gauge
(so --base-url works too): growth is the mean of the last `--rss-window` seconds against the mean of
the first window after warm-up. A 429 (queue full) is a refusal, not a failure; any other error,
dropped connection or in-band error event on an accepted request is a failure.

    python -m tests.bench.soak                           # 64 clients, 2 min warm-up + 5 min, SmolLM2
    python -m tests.bench.soak --clients 16 --duration 60 --server-arg=--model --server-arg=./my-model
    python -m tests.bench.soak --base-url http://127.0.0.1:8000 --model smollm2-135m-instruct

Prints one JSON object (also written to --out); exit status 0 when every check passes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.server_arg import add_server_args, serving  # noqa: E402

PROMPTS = [
    "Explain why the sky is blue.", "Write a short poem about the sea.", "What is a neural network?",
    "Give three tips for learning a language.", "Describe the water cycle.", "Why do cats purr?",
    "Summarise the plot of Hamlet.", "How does a bicycle stay upright?", "What is inflation?",
    "List some uses of copper.", "How do vaccines work?", "What causes the seasons?",
]


@dataclass
class Tally:
    ok: int = 0
    refused: int = 0  # 429: never accepted
    disconnected: int = 0  # left mid-stream on purpose
    failures: list[str] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    tokens: int = 0


def _metrics(base_url: str, model: str, headers: dict) -> dict[str, float]:
    want = {"slimserve_engine_aborted_sequences_total": "aborted", "slimserve_num_requests_running": "running",
            "slimserve_num_requests_waiting": "waiting", "slimserve_process_resident_memory_bytes": "rss",
            "slimserve_kv_cache_tokens": "kv_tokens"}
    out = {v: 0.0 for v in want.values()}
    text = httpx.get(base_url + "/metrics", headers=headers, timeout=30).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in want and s.labels.get("model", model) == model:
                out[want[s.name]] = s.value
    return out


async def _one(http: httpx.AsyncClient, model: str, rng: random.Random, leave: bool, tally: Tally,
               max_tokens: int) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": rng.choice(PROMPTS)}], "stream": True,
            "max_tokens": 512 if leave else rng.randint(max_tokens // 4, max_tokens), "temperature": 0.7,
            "ignore_eos": leave, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    events = 0
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code == 429:
                tally.refused += 1
                await r.aread()
                return
            if r.status_code != 200:
                tally.failures.append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                return
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    tally.failures.append(f"in-band error: {chunk['error']['message'][:200]}")
                    return
                events += 1
                if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter()
                if chunk.get("usage"):
                    tally.tokens += chunk["usage"]["completion_tokens"]
                if leave and events >= 4:
                    tally.disconnected += 1
                    return  # closing the stream here is the client going away
            if not done:
                tally.failures.append("stream ended without [DONE]")
                return
    except httpx.HTTPError as exc:
        tally.failures.append(f"{type(exc).__name__}: {exc}")
        return
    tally.ok += 1
    tally.e2e.append(time.perf_counter() - start)
    if first is not None:
        tally.ttft.append(first - start)


async def _client(i: int, base_url: str, model: str, deadline: float, disconnect_every: int, tally: Tally,
                  headers: dict, max_tokens: int) -> None:
    rng = random.Random(i)
    n = 0
    async with httpx.AsyncClient(base_url=base_url, timeout=600, headers=headers) as http:
        while time.monotonic() < deadline:
            n += 1
            leave = disconnect_every > 0 and (n + i) % disconnect_every == 0
            await _one(http, model, rng, leave, tally, max_tokens)


async def _sample_rss(base_url: str, model: str, headers: dict, stop: asyncio.Event, out: list) -> None:
    start = time.monotonic()
    while not stop.is_set():
        m = await asyncio.to_thread(_metrics, base_url, model, headers)
        out.append((time.monotonic() - start, m["rss"]))
        try:
            await asyncio.wait_for(stop.wait(), 2.0)
        except TimeoutError:
            pass


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 4)


def soak(base_url: str, model: str, *, clients: int = 64, duration: float = 300, warmup: float = 120,
         disconnect_every: int = 10, rss_window: float = 30, max_tokens: int = 64, api_key: str | None = None,
         max_rss_growth: float = 0.05) -> dict:
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    before = _metrics(base_url, model, headers)
    tally, rss = Tally(), []

    async def run() -> None:
        stop = asyncio.Event()
        sampler = asyncio.create_task(_sample_rss(base_url, model, headers, stop, rss))
        deadline = time.monotonic() + warmup + duration
        await asyncio.gather(*[_client(i, base_url, model, deadline, disconnect_every, tally, headers, max_tokens)
                               for i in range(clients)])
        stop.set()
        await sampler

    started = time.perf_counter()
    asyncio.run(run())
    wall = time.perf_counter() - started
    settle = time.monotonic() + 30  # aborts are counted between engine steps; let them land
    after = _metrics(base_url, model, headers)
    while time.monotonic() < settle and (after["aborted"] - before["aborted"] < tally.disconnected
                                         or after["running"] or after["waiting"]):
        time.sleep(0.5)
        after = _metrics(base_url, model, headers)
    base = [v for t, v in rss if warmup <= t < warmup + rss_window] or [v for _, v in rss[:1]]
    last = [v for t, v in rss if t >= rss[-1][0] - rss_window] if rss else []
    growth = (statistics.mean(last) - statistics.mean(base)) / statistics.mean(base) if base and last else None
    aborted = int(after["aborted"] - before["aborted"])
    result = {
        "model": model, "clients": clients, "duration_s": duration, "warmup_s": warmup, "wall_s": round(wall, 1),
        "requests_ok": tally.ok, "requests_refused_429": tally.refused, "disconnected_on_purpose": tally.disconnected,
        "failed_accepted": len(tally.failures), "failure_examples": tally.failures[:5],
        "engine_aborted_delta": aborted, "left_running": after["running"], "left_waiting": after["waiting"],
        "left_kv_tokens": after["kv_tokens"],
        "output_tokens": tally.tokens, "output_tokens_per_s": round(tally.tokens / wall, 1),
        "ttft_s": {"p50": _pct(tally.ttft, .5), "p90": _pct(tally.ttft, .9), "p99": _pct(tally.ttft, .99)},
        "e2e_s": {"p50": _pct(tally.e2e, .5), "p90": _pct(tally.e2e, .9), "p99": _pct(tally.e2e, .99)},
        "rss_mib": {"after_warmup": round(statistics.mean(base) / 2**20, 1) if base else None,
                    "end": round(statistics.mean(last) / 2**20, 1) if last else None,
                    "peak": round(max(v for _, v in rss) / 2**20, 1) if rss else None},
        "rss_growth": round(growth, 4) if growth is not None else None,
        "rss_timeline_mib": [[round(t), round(v / 2**20, 1)] for t, v in rss[::15]],  # every ~30 s
    }
    result["checks"] = {
        "no_failed_accepted_requests": not tally.failures,
        "disconnects_stopped_generation": aborted == tally.disconnected,
        "nothing_left_running": after["running"] == 0 and after["waiting"] == 0 and after["kv_tokens"] == 0,
        "rss_growth_below_limit": growth is not None and growth < max_rss_growth,
    }
    result["passed"] = all(result["checks"].values())
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--api-key")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=300, help="seconds measured after the warm-up")
    ap.add_argument("--warmup", type=float, default=120, help="seconds before measuring; RSS climbs for ~2 min")
    ap.add_argument("--rss-window", type=float, default=30, help="seconds averaged at each end for RSS growth")
    ap.add_argument("--disconnect-every", type=int, default=10, help="every Nth request of a client leaves early")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-rss-growth", type=float, default=0.05)
    ap.add_argument("--out", type=Path, default=Path("results/soak.json"))
    add_server_args(ap)
    args = ap.parse_args(argv)

    with serving(args.server_arg, Path("/tmp/slimserve-soak.log"), base_url=args.base_url) as server:
        result = soak(server.base_url, args.model, clients=args.clients, duration=args.duration, warmup=args.warmup,
                      disconnect_every=args.disconnect_every, rss_window=args.rss_window, max_tokens=args.max_tokens,
                      api_key=args.api_key, max_rss_growth=args.max_rss_growth)
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
