"""Speculation speed-up on the PyTorch engine: the same greedy chat requests to a server without and a
server with `--speculative-config` (prompt lookup, '{"method": "ngram", ...}', by default; or
'{"method": "quantized_self"}', the model's own int4 copy drafting), on input-grounded prompts (repeat,
quote, rewrite, extract from a given text) and on open questions, one request at a time and 16 at once.

    python -m tests.bench.prompt_lookup [--dtype float32] [--max-tokens 96] [--concurrency 1,16]
    python -m tests.bench.prompt_lookup --speculative-config '{"method": "quantized_self"}' --out ...

Both servers (the embedded SmolLM2-135M-Instruct unless --server-arg --model=...) run side by side and
take turns, prompt by prompt at c=1 and round by round at c=16 (or, with --load closed, 16 closed-loop
clients in two turns), order swapped each turn (this machine is noisy); texts are compared. Writes
tests/bench/figures/prompt_lookup_smollm2.json and .png and prints the CPU model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

from tests.bench.machine import describe, summary
from tests.bench.output import write_result
from tests.bench.server_arg import add_server_args, serving

FIGURES = Path(__file__).parent / "figures"
LICENSES = Path("/usr/share/common-licenses")

OPEN = ["What is the capital of France and why is it famous?", "Give me three tips for staying healthy.",
        "Explain what a black hole is.", "Write a short poem about autumn.", "How do airplanes fly?",
        "What are the benefits of reading books?", "Describe a day at the beach.", "Why is the sky blue?",
        "How does a computer work?", "What should I cook for dinner tonight?", "Tell me a fun fact about cats.",
        "How can I learn a new language?", "What is photosynthesis?", "Write a short story about a robot.",
        "What causes rain?", "Why do we need sleep?"]

GROUNDED = ["Repeat this text word for word:\n\n{p}",
            "Here is a passage:\n\n{p}\n\nQuote its first two sentences exactly.",
            "Rewrite the following text as a bulleted list, one sentence per bullet, keeping the wording:\n\n{p}",
            "Extract every sentence that contains the word \"{w}\" from this text:\n\n{p}",
            "Correct any typos in this text and return it in full:\n\n{p}",
            "Copy the following paragraph exactly, then stop:\n\n{p}"]


def passages(count: int) -> list[str]:
    """Paragraphs of 40-110 words from offline text: Debian's license texts, else this repo's docs."""
    files = sorted(LICENSES.glob("*")) if LICENSES.is_dir() else []
    files = [f for f in files if f.is_file()] or sorted((Path(__file__).parents[2] / "docs").glob("*.md"))
    found: list[str] = []
    for f in files:
        for block in re.split(r"\n\s*\n", f.read_text(errors="ignore")):
            text = " ".join(block.split())
            if 40 <= len(text.split()) <= 110 and not text.startswith(("|", "#", "`", "-", "*")):
                found.append(text)
    step = max(1, len(found) // count)
    return found[::step][:count]


def grounded_prompts(count: int) -> list[str]:
    out = []
    for i, p in enumerate(passages(count)):
        words = [w.strip(".,;:()\"'").lower() for w in p.split()]
        word = max(set(w for w in words if len(w) > 4), key=words.count, default="the")
        out.append(GROUNDED[i % len(GROUNDED)].format(p=p, w=word))
    return out


async def one(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int):
    t0 = time.perf_counter()
    r = await client.post(f"{url}/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
        "temperature": 0})
    r.raise_for_status()
    body = r.json()
    return body["choices"][0]["message"]["content"], body["usage"]["completion_tokens"], time.perf_counter() - t0


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds a server process has used so far (all its threads; Linux /proc). The torch
    engine runs inside the server process; a vLLM engine's worker process would not be counted."""
    if pid is None:
        return float("nan")
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def spec_counts(client: httpx.AsyncClient, url: str) -> tuple[float, float]:
    text = (await client.get(f"{url}/metrics")).text

    def total(name: str) -> float:
        return sum(float(m) for m in re.findall(rf"^{name}_total{{[^}}]*}} (\S+)$", text, re.M))

    return total("slimserve_spec_decode_num_draft_tokens"), total("slimserve_spec_decode_num_accepted_tokens")


async def closed_loop(client: httpx.AsyncClient, url: str, model: str, prompts: list[str], concurrency: int,
                      max_tokens: int) -> list:
    """`concurrency` clients, each sending the next prompt as soon as its last answer is back (as vLLM's
    benchmark with --max-concurrency): the batch stays full until the prompts run out."""
    results, next_index = [None] * len(prompts), iter(range(len(prompts)))

    async def client_loop() -> None:
        for i in next_index:
            results[i] = await one(client, url, model, prompts[i], max_tokens)

    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return results


async def measure(urls: dict[str, str], model: str, prompts: list[str], concurrency: int, rounds: int,
                  max_tokens: int, load: str = "rounds", pids: dict[str, int | None] | None = None) -> dict:
    """tok/s of each server: c=1 prompt by prompt; else `rounds` rounds of `concurrency` prompts at once
    (load "rounds": each round waits for its slowest answer), or the same requests from `concurrency`
    closed-loop clients in two turns (load "closed"). With the servers' `pids`, also each server's CPU seconds
    (all threads) per output token over its turns, the figure routing costs are in."""
    totals = {k: [0, 0.0] for k in urls}
    cpu = {k: 0.0 for k in urls}
    pids = pids or {}
    texts: dict[str, list[str]] = {k: [] for k in urls}
    async with httpx.AsyncClient(timeout=1800) as client:
        before = await spec_counts(client, urls["spec"])
        if concurrency == 1:
            turns = [[p] for p in prompts]
        elif load == "closed":
            turns = [prompts[:concurrency] * max(1, rounds // 2)] * 2
        else:
            turns = [prompts[:concurrency]] * rounds
        for i, batch in enumerate(turns):
            for name in (list(urls) if i % 2 == 0 else list(urls)[::-1]):
                t0, c0 = time.perf_counter(), cpu_seconds(pids.get(name))
                if load == "closed" and concurrency > 1:
                    results = await closed_loop(client, urls[name], model, batch, concurrency, max_tokens)
                else:
                    results = await asyncio.gather(*(one(client, urls[name], model, p, max_tokens) for p in batch))
                totals[name][0] += sum(n for _, n, _ in results)
                totals[name][1] += time.perf_counter() - t0
                cpu[name] += cpu_seconds(pids.get(name)) - c0
                texts[name] += [t for t, _, _ in results]
        after = await spec_counts(client, urls["spec"])
    tok_s = {k: n / s for k, (n, s) in totals.items()}
    proposed, accepted = after[0] - before[0], after[1] - before[1]
    return {"concurrency": concurrency, "requests": len(texts["plain"]), "plain_tok_s": tok_s["plain"],
            "spec_tok_s": tok_s["spec"], "speedup": tok_s["spec"] / tok_s["plain"],
            "identical_texts": sum(a == b for a, b in zip(texts["plain"], texts["spec"])),
            "draft_tokens": proposed, "accepted_tokens": accepted,
            "acceptance": accepted / proposed if proposed else None,
            "tokens": {k: n for k, (n, _) in totals.items()},
            "cpu_seconds_per_token": {k: cpu[k] / totals[k][0] if totals[k][0] else None for k in urls}}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["runs"]
    labels = [f"{r['prompts']}\nc={r['concurrency']}" for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(labels, [r["speedup"] for r in rows], color=["tab:blue" if r["prompts"] == "grounded" else
                                                                 "tab:orange" for r in rows])
    ax.bar_label(bars, fmt="%.2fx")
    ax.axhline(1.3, ls="--", c="tab:blue", lw=1, label="target, grounded (1.3x)")
    ax.axhline(0.95, ls=":", c="tab:orange", lw=1, label="target, open (0.95x)")
    ax.axhline(1.0, c="grey", lw=0.5)
    ax.set_ylabel("tok/s with speculation / without")
    method = result["speculative_config"].get("method")
    ax.set_title(f"Speculation ({method}), {Path(result['model']).name}, {result['dtype']}, greedy\n"
                 f"{summary(result['cpu'])}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    add_server_args(ap)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--c1-prompts", type=int, default=6, help="prompts per set at c=1")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per set at c>1")
    ap.add_argument("--load", choices=("rounds", "closed"), default="rounds",
                    help="at c>1: rounds of c prompts at once, or c closed-loop clients sending as many")
    ap.add_argument("--speculative-config", default='{"method": "ngram", "num_speculative_tokens": 4, '
                                                    '"prompt_lookup_max": 4, "prompt_lookup_min": 2}')
    ap.add_argument("--sets", default="grounded,open")
    ap.add_argument("--open-prompts", type=Path, help="a .jsonl of {\"prompt\": ...} to use as the open set "
                    "(e.g. the router's held-out prompts: python -m tests.bench.router_prompts)")
    ap.add_argument("--out", type=Path, default=FIGURES / "prompt_lookup_smollm2.json")
    args = ap.parse_args(argv)
    cpu = describe()
    load_before = os.getloadavg()
    print(f"CPU: {summary(cpu)}; load average {load_before[0]:.2f}")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    width = max(concurrencies)
    open_set = OPEN if args.open_prompts is None else [json.loads(line)["prompt"] for line in
                                                       args.open_prompts.read_text().splitlines() if line.strip()]
    sets = {"grounded": grounded_prompts(max(width, args.c1_prompts)), "open": open_set[:max(width, args.c1_prompts)]}
    base = ["--model", args.model, "--dtype", args.dtype, "--max-num-seqs", str(width), *args.server_arg]
    logs = Path(tempfile.mkdtemp(prefix="prompt-lookup-"))
    with ExitStack() as stack:
        served = {"plain": stack.enter_context(serving(base, logs / "plain.log")),
                  "spec": stack.enter_context(serving(base + ["--speculative-config", args.speculative_config],
                                                      logs / "spec.log"))}
        urls, pids = {k: v.base_url for k, v in served.items()}, {k: v.pid for k, v in served.items()}
        model = httpx.get(f"{urls['plain']}/v1/models").json()["data"][0]["id"]

        async def run() -> list[dict]:
            async with httpx.AsyncClient(timeout=600) as client:
                for url in urls.values():
                    await one(client, url, model, "warm up", 8)
            runs = []
            for name in args.sets.split(","):
                for c in concurrencies:
                    prompts = sets[name][: args.c1_prompts] if c == 1 else sets[name]
                    r = {"prompts": name, **await measure(urls, model, prompts, c, args.rounds, args.max_tokens,
                                                                   args.load, pids)}
                    print(f"{name:9s} c={c:<3d} plain {r['plain_tok_s']:6.1f} tok/s, speculation {r['spec_tok_s']:6.1f}"
                          f" tok/s: {r['speedup']:.2f}x; identical {r['identical_texts']}/{r['requests']}; accepted "
                          f"{r['accepted_tokens']:.0f}/{r['draft_tokens']:.0f} drafted tokens; CPU s/token "
                          + " against ".join(f"{(v or float('nan')) * 1e3:.1f} ms"
                                             for v in r["cpu_seconds_per_token"].values()))
                    runs.append(r)
            return runs

        runs = asyncio.run(run())
    result = {"model": args.model, "cpu": cpu, "dtype": args.dtype, "max_tokens": args.max_tokens,
              "speculative_config": json.loads(args.speculative_config), "c1_prompts": args.c1_prompts,
              "rounds": args.rounds, "load": args.load, "open_prompts": str(args.open_prompts or "built in"),
              "load_average_before_after": [load_before[0], os.getloadavg()[0]],
              "server_args": args.server_arg, "runs": runs}
    write_result(result, args.out, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
