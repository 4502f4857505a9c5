"""Prefix caching and chunked prefill on the PyTorch engine, measured on a real model.

    python -m tests.bench.prefix_cache [--rounds 3] [--server-arg --model=FOLDER]

Two servers side by side, taking turns round by round: `default` (prefix cache on, chunked prefill at
the default budget) and `plain` (--no-enable-prefix-caching --max-num-batched-tokens 100000: neither).

1. TTFT of a streamed chat request with a ~1,000-token system prompt, first vs second (same system
   prompt, another question). Each round uses a system prompt of its own, so the first is never cached.
2. A running row's decode speed while another request with a 1,000+-token prompt arrives: the row's
   tokens per second from that arrival until the long request's first token, and its longest gap.

Prints the figures, the CPU and the load; writes tests/bench/figures/prefix_cache_smollm2.json (+ .png).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

from tests.bench.machine import describe, summary
from tests.bench.prompt_lookup import passages
from tests.bench.server_arg import add_server_args, serving

FIGURES = Path(__file__).parent / "figures"
QUESTIONS = ["Summarize the text above in one sentence.", "What is the main topic of the text above?"]


def long_text(words: int, offset: int) -> str:
    """About `words` words of offline text (license paragraphs), starting at paragraph `offset`."""
    found = passages(400)
    out: list[str] = []
    i = offset
    while sum(len(p.split()) for p in out) < words:
        out.append(found[i % len(found)])
        i += 1
    return "\n\n".join(out)


async def stream(client: httpx.AsyncClient, url: str, messages: list[dict], max_tokens: int, on_token=None):
    """Streamed chat request: (ttft, token times)."""
    t0 = time.perf_counter()
    times: list[float] = []
    body = {"model": "m", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                delta = json.loads(line[6:])["choices"][0]["delta"]
                if delta.get("content"):
                    times.append(time.perf_counter())
                    if on_token is not None:
                        on_token(len(times))
    return times[0] - t0, times


async def ttft_pair(client, url: str, system: str) -> tuple[float, float]:
    firsts = []
    for q in QUESTIONS:
        ttft, _ = await stream(client, url, [{"role": "system", "content": system}, {"role": "user", "content": q}], 4)
        firsts.append(ttft)
    return firsts[0], firsts[1]


async def decode_during_prefill(client, url: str, long_prompt: str) -> dict:
    """A row decodes 160 tokens; after its 20th, a request with a long prompt arrives."""
    arrived = asyncio.Event()
    mark: dict[str, float] = {}

    def on_token(n: int) -> None:
        if n == 20:
            arrived.set()

    row = asyncio.create_task(stream(client, url, [{"role": "user", "content": "Tell me a long story."}], 160,
                                     on_token))
    await arrived.wait()
    mark["sent"] = time.perf_counter()
    ttft, _ = await stream(client, url, [{"role": "user", "content": long_prompt}], 1)
    mark["first"] = mark["sent"] + ttft
    _, times = await row
    window = [t for t in times if mark["sent"] <= t <= mark["first"]]
    gaps = [b - a for a, b in zip(times, times[1:])]
    before = [b - a for a, b in zip(times, times[1:]) if b < mark["sent"]]
    return {"long_ttft_s": ttft, "row_tokens_during": len(window),
            "row_tok_s_during": len(window) / ttft, "row_tok_s_before": len(before) / sum(before) if before else 0,
            "row_max_gap_s": max(gaps)}


async def run(urls: dict[str, str], rounds: int, tokenizer) -> dict:
    out: dict = {name: {"ttft": [], "decode": []} for name in urls}
    async with httpx.AsyncClient(timeout=600) as client:
        for r in range(rounds):
            system = long_text(800, 60 * r)
            prompt = long_text(850, 60 * r + 30) + "\n\nSummarize this."
            order = list(urls) if r % 2 == 0 else list(reversed(urls))
            for name in order:  # each server its own texts per round: nothing cached from the other's turn
                first, second = await ttft_pair(client, urls[name], system + f"\n(round {r}, {name})")
                out[name]["ttft"].append({"first_s": first, "second_s": second, "ratio": second / first})
                d = await decode_during_prefill(client, urls[name], f"({name}, round {r})\n" + prompt)
                out[name]["decode"].append(d)
                print(f"round {r} {name}: TTFT {first:.3f} s -> {second:.3f} s ({second / first:.2f}x); row "
                      f"{d['row_tok_s_before']:.1f} tok/s before, {d['row_tok_s_during']:.1f} tok/s during a "
                      f"{d['long_ttft_s']:.2f} s prefill, longest gap {d['row_max_gap_s']:.2f} s", flush=True)
    out["system_prompt_tokens"] = _tokens(tokenizer, [{"role": "system", "content": long_text(800, 0)},
                                                     {"role": "user", "content": QUESTIONS[0]}])
    long_prompt = long_text(850, 30) + "\n\nSummarize this."
    out["long_prompt_tokens"] = _tokens(tokenizer, [{"role": "user", "content": long_prompt}])
    return out


def _tokens(tokenizer, messages: list[dict]) -> int:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def medians(results: dict, name: str) -> dict:
    t, d = results[name]["ttft"], results[name]["decode"]
    med = lambda rows, k: statistics.median(x[k] for x in rows)  # noqa: E731
    return {"ttft_first_s": med(t, "first_s"), "ttft_second_s": med(t, "second_s"), "ttft_ratio": med(t, "ratio"),
            "row_tok_s_before": med(d, "row_tok_s_before"), "row_tok_s_during": med(d, "row_tok_s_during"),
            "row_max_gap_s": med(d, "row_max_gap_s"), "long_ttft_s": med(d, "long_ttft_s")}


def plot(summary_rows: dict, title: str, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    names = list(summary_rows)
    x = range(len(names))
    a.bar([i - 0.2 for i in x], [summary_rows[n]["ttft_first_s"] for n in names], 0.4, label="first")
    a.bar([i + 0.2 for i in x], [summary_rows[n]["ttft_second_s"] for n in names], 0.4, label="second")
    a.set_xticks(list(x), names)
    a.set_ylabel("TTFT (s), ~1,000-token system prompt")
    a.legend()
    b.bar(names, [summary_rows[n]["row_tok_s_during"] for n in names])
    b.set_ylabel("running row tok/s while a 1,000+-token prompt prefills")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default=str(Path.home() / ".cache/slimserve/models/smollm2-135m-instruct"))
    add_server_args(ap)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    configs = {"default": [], "plain": ["--no-enable-prefix-caching", "--max-num-batched-tokens", "100000"]}
    machine_before = describe()
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        urls = {}
        for name, flags in configs.items():
            argv = ["--model", args.model, "--served-model-name", "m", *flags, *args.server_arg]
            served = stack.enter_context(serving(argv,
                                                 Path(tmp) / f"{name}.log"))
            urls[name] = served.base_url
        results = asyncio.run(run(urls, args.rounds, tokenizer))
    machine = describe()
    machine["load_avg_before_1_5_15"] = machine_before["load_avg_1_5_15"]
    rows = {name: medians(results, name) for name in configs}
    report = {"command": " ".join(["python -m tests.bench.prefix_cache", *sys.argv[1:]]), "machine": machine,
              "servers": {n: ["slimserve serve --model", args.model, *f, *args.server_arg] for n, f in configs.items()},
              "system_prompt_tokens": results.pop("system_prompt_tokens"),
              "long_prompt_tokens": results.pop("long_prompt_tokens"), "medians": rows, "rounds": results,
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    print(f"\n{summary(machine)}; load average {machine_before['load_avg_1_5_15']} before, "
          f"{machine['load_avg_1_5_15']} after")
    print(f"system prompt ~{report['system_prompt_tokens']} tokens, "
          f"long prompt ~{report['long_prompt_tokens']} tokens; "
          f"medians of {args.rounds} rounds:")
    for name, m in rows.items():
        print(f"  {name:8s} TTFT first {m['ttft_first_s']:.3f} s, second {m['ttft_second_s']:.3f} s "
              f"({m['ttft_ratio']:.2f}x); running row {m['row_tok_s_before']:.1f} tok/s alone, "
              f"{m['row_tok_s_during']:.1f} tok/s during the long prefill ({m['long_ttft_s']:.2f} s), longest gap "
              f"{m['row_max_gap_s']:.2f} s")
    FIGURES.mkdir(exist_ok=True)
    (FIGURES / "prefix_cache_smollm2.json").write_text(json.dumps(report, indent=1))
    plot(rows, f"{summary(machine)}; load {machine_before['load_avg_1_5_15'][0]}", FIGURES / "prefix_cache_smollm2.png")
    print(f"wrote {FIGURES / 'prefix_cache_smollm2.json'}")


if __name__ == "__main__":
    main()
