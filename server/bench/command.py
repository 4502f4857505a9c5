"""`slimserve bench ...`: parse the flags, run the load generator, print and write the report."""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from pathlib import Path

from server.errors import ConfigError


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("concurrency levels must be integers >= 1")
    return values


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="load-test any OpenAI-compatible server",
                       description="Per concurrency level: TTFT, inter-token and end-to-end latency p50/p90/p99, "
                                   "output tokens/s, requests/s and errors; token counts from the server's usage.")
    p.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000 (a /v1 suffix is fine)")
    p.add_argument("--model", required=True, help="the model id to send")
    p.add_argument("--adapters", help="comma-separated adapter names; request i asks for adapter i mod N")
    p.add_argument("--concurrency", type=_ints, default=[1], help="comma-separated levels, e.g. 1,4,16")
    p.add_argument("--num-prompts", type=int, default=16, help="requests per level")
    p.add_argument("--input-len", type=int, default=128, help="about this many prompt tokens (generated prompts)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--stream", action="store_true", help="stream (needed for TTFT and inter-token latency)")
    p.add_argument("--chat", action="store_true", help="/v1/chat/completions instead of /v1/completions")
    p.add_argument("--ignore-eos", action="store_true", help="send vLLM's ignore_eos: every request runs to "
                                                             "max_tokens (servers without it reject the field)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--api-key")
    p.add_argument("--prompts", type=Path, help="text (one prompt a line) or JSONL with `prompt` or `messages`")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1, help="requests sent before measuring")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", type=Path, help="write the results as JSON here")


def config_from(args: argparse.Namespace):
    from server.bench.loadgen import BenchConfig

    if args.num_prompts < 1:
        raise ConfigError("num_prompts", "must be at least 1")
    if args.max_tokens < 1:
        raise ConfigError("max_tokens", "must be at least 1")
    adapters = [a.strip() for a in (args.adapters or "").split(",") if a.strip()]
    return BenchConfig(base_url=args.base_url, model=args.model, adapters=adapters, concurrency=args.concurrency,
                       num_prompts=args.num_prompts, max_tokens=args.max_tokens, stream=args.stream, chat=args.chat,
                       api_key=args.api_key, temperature=args.temperature, ignore_eos=args.ignore_eos,
                       timeout_s=args.timeout, warmup=args.warmup, progress=not args.no_progress)


def run(args: argparse.Namespace) -> int:
    from server.bench.loadgen import run_bench
    from server.bench.prompts import load_prompts, pick, synthetic_prompts
    from server.bench.report import markdown_table

    cfg = config_from(args)
    if args.prompts:
        prompts = pick(load_prompts(args.prompts), args.num_prompts, args.seed)
    else:
        prompts = synthetic_prompts(args.num_prompts, args.input_len, args.seed)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    result = asyncio.run(run_bench(cfg, prompts))
    config = {k: v for k, v in vars(args).items() if k not in ("command", "no_progress")}
    config["prompts"] = str(args.prompts) if args.prompts else f"synthetic(seed={args.seed})"
    config["out"] = str(args.out) if args.out else None
    report = {"started_at": started, "config": config, "client": {"python": platform.python_version(),
                                                                  "platform": platform.platform()}, **result}
    print(f"\n{cfg.base_url}  model={','.join(cfg.adapters) or cfg.model}  {args.num_prompts} prompts x "
          f"{args.max_tokens} max tokens, {'streamed' if cfg.stream else 'not streamed'}\n")
    print(markdown_table(report["levels"]))
    for lv in report["levels"]:
        for msg in lv["error_messages"]:
            print(f"concurrency {lv['concurrency']}: error: {msg}", file=sys.stderr)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    return 1 if all(lv["completed"] == 0 for lv in report["levels"]) else 0
