"""Structured outputs on SmolLM2-135M-Instruct, both engines (issue #18's figures): how often a
`json_schema` (strict, nested) answer parses and matches the schema, what the constraint costs in
output tokens/s at concurrency 1 and 16, and how often `tool_choice: required` gives calls whose
arguments match the function's parameters schema.

    python -m tests.bench.structured [--engines torch,vllm] [--num-prompts 50] [--threads 2]

The unconstrained side asks the same prompts for the same number of tokens as the constrained answer
had (EOS ignored), so both sides decode equal work and the difference is the constraint's cost. At
16 they alternate block by block (16 prompts constrained, the same 16 free; a second `--rounds`
runs free first), as load from other jobs drifts over minutes; at concurrency 1 they alternate
prompt by prompt (on `--c1-prompts` of them: one at a time is the slow part).
A profile of the grammar itself (mask + advance per token, replayed over the answers, in-process)
says where the time goes. Writes tests/bench/figures/structured_smollm2.json and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import describe  # noqa: E402
from bench.output import pyplot, save_figure  # noqa: E402
from bench.server_arg import add_server_args, serving  # noqa: E402
from conftest import engine_flags  # noqa: E402

FIGURES = Path(__file__).parent / "figures"

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "address": {"type": "object", "properties": {
            "street": {"type": "string", "maxLength": 32},
            "city": {"type": "string", "maxLength": 20},
            "country": {"type": "string", "maxLength": 20}},
            "required": ["street", "city", "country"], "additionalProperties": False},
        "job": {"type": "object", "properties": {
            "title": {"type": "string", "maxLength": 24},
            "years": {"type": "integer", "minimum": 0, "maximum": 60},
            "remote": {"type": "boolean"}},
            "required": ["title", "years", "remote"], "additionalProperties": False},
        "pets": {"type": "array", "maxItems": 2, "items": {"type": "object", "properties": {
            "species": {"enum": ["cat", "dog", "bird", "fish"]},
            "name": {"type": "string", "maxLength": 16}},
            "required": ["species", "name"], "additionalProperties": False}},
    },
    "required": ["name", "age", "address", "job", "pets"], "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": PERSON}}

TRIP = {"type": "object", "properties": {
    "destination": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                     "country": {"type": "string", "maxLength": 20}},
                    "required": ["city", "country"], "additionalProperties": False},
    "nights": {"type": "integer", "minimum": 1, "maximum": 30},
    "travellers": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                         "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"], "additionalProperties": False}}},
    "required": ["destination", "nights", "travellers"], "additionalProperties": False}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "book_trip", "description": "Book a trip", "parameters": TRIP}},
         {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                           "parameters": WEATHER}}]

FIRST = "Anna Ben Chloe David Emma Farid Grace Hugo Ines Jonas Kira Liam Mona Noah Olga Pablo Rosa Sami".split()
LAST = "Smith Garcia Novak Okafor Lindqvist Rossi Tanaka Dubois Weber Kowalski Silva Moreau Byrne".split()
PLACES = [("Lisbon", "Portugal"), ("Oslo", "Norway"), ("Lyon", "France"), ("Porto", "Portugal"),
          ("Kyoto", "Japan"), ("Leeds", "England"), ("Graz", "Austria"), ("Cork", "Ireland"),
          ("Turin", "Italy"), ("Gdansk", "Poland"), ("Quito", "Ecuador"), ("Perth", "Australia")]
STREETS = "Mill Lane,High Street,Oak Avenue,River Road,Station Road,Church Street,Park Lane".split(",")
JOBS = "baker,nurse,teacher,engineer,farmer,pilot,librarian,chef,carpenter,designer".split(",")
PETS = "cat dog bird fish".split()


def person_prompts(n: int, seed: int) -> list[str]:
    """Seeded, offline: each prompt describes a fictional person the answer is to record as JSON."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        city, country = rng.choice(PLACES)
        pets = rng.sample(PETS, rng.randint(0, 2))
        pet_text = " and ".join(f"a {p} called {rng.choice(FIRST)}" for p in pets) or "no pets"
        out.append(f"Write a JSON record for this person. {rng.choice(FIRST)} {rng.choice(LAST)} is "
                   f"{rng.randint(19, 80)} years old and lives at {rng.randint(1, 99)} {rng.choice(STREETS)}, "
                   f"{city}, {country}. They have worked as a {rng.choice(JOBS)} for {rng.randint(1, 30)} years, "
                   f"{'from home' if rng.random() < 0.5 else 'in an office'}, and have {pet_text}. "
                   f"Fields: name, age, address (street, city, country), job (title, years, remote), pets "
                   f"(species, name).")
    return out


def trip_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed + 1)
    out = []
    for _ in range(n):
        city, country = rng.choice(PLACES)
        if rng.random() < 0.7:
            who = " and ".join(f"{rng.choice(FIRST)} ({rng.randint(5, 80)})" for _ in range(rng.randint(1, 2)))
            out.append(f"Book {rng.randint(1, 14)} nights in {city}, {country} for {who}.")
        else:
            out.append(f"What will the weather be in {city} this weekend, in "
                       f"{rng.choice(['celsius', 'fahrenheit'])}?")
    return out


# ---------------------------------------------------------------- validation

def _small_check(value, schema: dict) -> bool:
    """The subset of JSON Schema used above, for machines without the jsonschema package."""
    if "enum" in schema:
        return value in schema["enum"]
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        return (isinstance(value, dict) and all(k in value for k in schema.get("required", []))
                and (schema.get("additionalProperties", True) is not False or set(value) <= set(props))
                and all(_small_check(v, props[k]) for k, v in value.items() if k in props))
    if kind == "array":
        return (isinstance(value, list) and schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", 1 << 30)
                and all(_small_check(v, schema["items"]) for v in value))
    if kind == "string":
        return isinstance(value, str) and len(value) <= schema.get("maxLength", 1 << 30)
    if kind == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)
                and schema.get("minimum", -(1 << 62)) <= value <= schema.get("maximum", 1 << 62))
    if kind == "boolean":
        return isinstance(value, bool)
    return True


def matches(text: str | None, schema: dict) -> bool:
    """Parses as JSON and matches the schema (jsonschema where installed)."""
    try:
        value = json.loads(text or "")
    except ValueError:
        return False
    try:
        import jsonschema
    except ImportError:
        return _small_check(value, schema)
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError:
        return False
    return True


def calls_valid(message: dict, finish: str | None) -> bool:
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    calls = message.get("tool_calls") or []
    return (finish == "tool_calls" and bool(calls)
            and all(c["function"]["name"] in schemas and matches(c["function"]["arguments"],
                                                                  schemas[c["function"]["name"]]) for c in calls))


# ---------------------------------------------------------------- requests

async def ask(http: httpx.AsyncClient, body: dict) -> dict:
    start = time.perf_counter()
    resp = await http.post("/v1/chat/completions", json=body)
    seconds = time.perf_counter() - start
    if resp.status_code != 200:
        return {"error": f"HTTP {resp.status_code}: {resp.text[:200]}", "seconds": seconds, "tokens": 0}
    data = resp.json()
    choice = data["choices"][0]
    return {"message": choice["message"], "finish": choice["finish_reason"], "seconds": seconds,
            "tokens": data["usage"]["completion_tokens"]}


def constrained(model: str, prompt: str, max_tokens: int) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "response_format": RESPONSE_FORMAT}


def free(model: str, prompt: str, tokens: int) -> dict:
    """The same prompt unconstrained, for exactly as many tokens as the constrained answer had."""
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max(tokens, 1),
            "temperature": 0, "ignore_eos": True}


async def gather_level(http: httpx.AsyncClient, bodies: list[dict], concurrency: int) -> tuple[list[dict], float]:
    gate = asyncio.Semaphore(concurrency)

    async def gated(body: dict) -> dict:
        async with gate:
            return await ask(http, body)

    start = time.perf_counter()
    results = await asyncio.gather(*[gated(b) for b in bodies])
    return list(results), time.perf_counter() - start


def figures(results: list[dict], seconds: float) -> dict:
    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "errors": sum("error" in r for r in results), "output_tokens": tokens,
            "seconds": round(seconds, 2), "output_tok_per_s": round(tokens / seconds, 2)}


async def run_engine(base_url: str, prompts: list[str], trips: list[str], max_tokens: int, tool_max_tokens: int,
                     top: int, c1_prompts: int, rounds: int) -> dict:
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(900, connect=30),
                                 limits=httpx.Limits(max_connections=top + 4)) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]
        await ask(http, constrained(model, prompts[0], 16))  # warm-up: grammar compiler, first batch
        await ask(http, free(model, prompts[0], 16))
        # concurrency `top`: blocks of `top` prompts, constrained then free on the same block (then free
        # first in a second round): load from other jobs drifts over minutes, a block takes seconds
        runs: dict[str, list] = {"constrained": [], "free": []}
        lengths = [0] * len(prompts)
        for rnd in range(rounds):
            for start in range(0, len(prompts), top):
                block = range(start, min(start + top, len(prompts)))
                for kind in (("constrained", "free") if rnd % 2 == 0 else ("free", "constrained")):
                    bodies = [constrained(model, prompts[i], max_tokens) if kind == "constrained"
                              else free(model, prompts[i], lengths[i]) for i in block]
                    results, seconds = await gather_level(http, bodies, top)
                    runs[kind].append((results, seconds))
                    if kind == "constrained" and rnd == 0:
                        for i, r in zip(block, results):
                            lengths[i] = r["tokens"]
        many = {kind: figures([r for res, _ in rs for r in res], sum(s for _, s in rs)) for kind, rs in runs.items()}
        print(f"  c{top}: constrained {many['constrained']['output_tok_per_s']:7.1f} tok/s, free "
              f"{many['free']['output_tok_per_s']:7.1f} tok/s", flush=True)
        # concurrency 1: constrained and free alternate prompt by prompt
        answers, free_c1 = [], []
        for p in prompts[:c1_prompts]:
            answers.append(await ask(http, constrained(model, p, max_tokens)))
            free_c1.append(await ask(http, free(model, p, answers[-1]["tokens"])))
        one = {"constrained": figures(answers, sum(a["seconds"] for a in answers)),
               "free": figures(free_c1, sum(r["seconds"] for r in free_c1))}
        print(f"  c1 : constrained {one['constrained']['output_tok_per_s']:7.1f} tok/s, free "
              f"{one['free']['output_tok_per_s']:7.1f} tok/s ({len(answers)} prompts)", flush=True)
        every = [r for res, _ in runs["constrained"] for r in res] + answers
        valid = [matches((a.get("message") or {}).get("content"), PERSON) and a.get("finish") == "stop"
                 for a in every]
        # tools: tool_choice required, validity only (concurrency `top`)
        tool_bodies = [{"model": model, "messages": [{"role": "user", "content": t}], "tools": TOOLS,
                        "tool_choice": "required", "max_tokens": tool_max_tokens, "temperature": 0} for t in trips]
        tool_results, tool_seconds = await gather_level(http, tool_bodies, top)
        tool_ok = [calls_valid(r.get("message") or {}, r.get("finish")) for r in tool_results]
    bad = [a for a, ok in zip(every, valid) if not ok][:3]
    cost = lambda level: round(1 - level["constrained"]["output_tok_per_s"] / level["free"]["output_tok_per_s"], 4)  # noqa: E731
    return {
        "model": model,
        "schema": {"answers": len(every), "valid": sum(valid), "valid_rate": round(sum(valid) / len(every), 4),
                   "mean_output_tokens": round(sum(lengths) / len(lengths), 1),
                   "examples": [a["message"]["content"] for a in answers[:2]],
                   "invalid_examples": [{k: a.get(k) for k in ("message", "finish", "error")} for a in bad]},
        "c1": {**one, "prompts": len(answers), "cost": cost(one)},
        f"c{top}": {**many, "rounds": rounds, "cost": cost(many)},
        "tools": {"requests": len(tool_results), "valid": sum(tool_ok), "valid_rate": round(sum(tool_ok) / len(tool_ok), 4),
                  "calls": sum(len((r.get("message") or {}).get("tool_calls") or []) for r in tool_results),
                  "seconds": round(tool_seconds, 2),
                  "example": (tool_results[0].get("message") or {}).get("tool_calls"),
                  "invalid_examples": [r for r, ok in zip(tool_results, tool_ok) if not ok][:3]},
        "lengths": lengths,
        "answers": [(a.get("message") or {}).get("content") for res, _ in runs["constrained"] for a in res],
    }


# ---------------------------------------------------------------- where the time goes

def grammar_profile(answers: list[str], model_dir: Path) -> dict:
    """The PyTorch engine's per-token grammar work, replayed in-process over the answers' tokens: fill
    the row's mask, apply it to a vocabulary of logits, accept the token (server/engines/torch/sampling.py
    and scheduler.py do these three per constrained row per step)."""
    import torch
    import xgrammar as xgr
    from transformers import AutoConfig, AutoTokenizer

    from server.engines.base import Guide
    from server.engines.guided import Grammars

    tok = AutoTokenizer.from_pretrained(model_dir)
    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    guide = Guide(json_schema=json.dumps(PERSON, sort_keys=True, separators=(",", ":")))  # as answers/tools.py
    start = time.perf_counter()
    grammars = Grammars(tok, vocab, {tok.eos_token_id})
    info_s = time.perf_counter() - start
    start = time.perf_counter()
    grammars.matcher(guide)
    compile_s = time.perf_counter() - start
    logits = torch.zeros(1, vocab)
    fill = apply = accept = 0.0
    n = 0
    for text in answers:
        if not text:
            continue
        matcher = grammars.matcher(guide)
        for token in tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]:
            bitmask = xgr.allocate_token_bitmask(1, vocab)
            t0 = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask, 0)
            t1 = time.perf_counter()
            xgr.apply_token_bitmask_inplace(logits, bitmask, indices=[0])
            t2 = time.perf_counter()
            ok = matcher.accept_token(token)
            t3 = time.perf_counter()
            if not ok:  # the model's own tokenization may differ from the canonical one: stop this answer
                break
            fill, apply, accept, n = fill + t1 - t0, apply + t2 - t1, accept + t3 - t2, n + 1
    per = lambda s: round(s / max(n, 1) * 1e6, 1)  # noqa: E731
    return {"tokens": n, "fill_mask_us": per(fill), "apply_mask_us": per(apply), "accept_us": per(accept),
            "total_us_per_token": per(fill + apply + accept), "tokenizer_info_s": round(info_s, 3),
            "compile_s": round(compile_s, 3)}


def plot(result: dict, path: Path) -> None:
    plt = pyplot()

    engines = list(result["engines"])
    top = f"c{result['settings']['concurrency']}"
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [2, 1]})
    labels, width = [], 0.38
    for i, (engine, level) in enumerate((e, lv) for e in engines for lv in ("c1", top)):
        r = result["engines"][engine][level]
        ax.bar(i - width / 2, r["free"]["output_tok_per_s"], width, color="tab:gray",
               label="unconstrained" if i == 0 else None)
        ax.bar(i + width / 2, r["constrained"]["output_tok_per_s"], width, color="tab:blue",
               label="json_schema (strict)" if i == 0 else None)
        ax.text(i + width / 2, r["constrained"]["output_tok_per_s"], f"{-100 * r['cost']:+.0f}%", ha="center",
                va="bottom", fontsize=8)
        labels.append(f"{engine}\nconcurrency {level[1:]}")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("output tokens/s")
    ax.set_title("throughput, same tokens decoded on both sides")
    ax.legend(fontsize=8)
    x = range(len(engines))
    bx.bar([i - width / 2 for i in x], [100 * result["engines"][e]["schema"]["valid_rate"] for e in engines], width,
           label="json_schema answers", color="tab:blue")
    bx.bar([i + width / 2 for i in x], [100 * result["engines"][e]["tools"]["valid_rate"] for e in engines], width,
           label="tool_choice required", color="tab:green")
    bx.set_xticks(list(x), engines)
    bx.set_ylim(0, 105)
    bx.set_ylabel("% valid and matching the schema")
    bx.legend(fontsize=8, loc="lower right")
    c = result["cpu"]
    fig.suptitle(f"SmolLM2-135M-Instruct, {result['settings']['prompts']} prompts; {c['model_name']}, {c['cpus']} "
                 f"CPUs, {result['settings']['threads']} thread(s)", fontsize=10)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    from bench.compare import thread_env

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engines", default="torch,vllm")
    ap.add_argument("--num-prompts", type=int, default=50)
    ap.add_argument("--max-tokens", type=int, default=256, help="above the schema's longest answer")
    ap.add_argument("--tool-max-tokens", type=int, default=384)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2, help="at --concurrency: 1 = each block constrained then free; 2 = also free first")
    ap.add_argument("--c1-prompts", type=int, help="prompts at concurrency 1 (default: all; it is the slow part)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=FIGURES / "structured_smollm2.json")
    add_server_args(ap)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if args.base_url and len(engines) != 1:
        ap.error("--base-url measures one server: name its engine alone in --engines")
    machine = describe()
    print(f"CPU: {machine['model_name']}, {machine['cpus']} CPUs, avx512: {','.join(machine['avx512']) or 'no'}, "
          f"amx: {','.join(machine['amx']) or 'no'}; load average {machine['load_avg_1_5_15']}", flush=True)
    prompts = person_prompts(args.num_prompts, args.seed)
    trips = trip_prompts(args.num_prompts, args.seed)
    result = {"cpu": machine, "settings": {"prompts": args.num_prompts, "max_tokens": args.max_tokens,
                                           "tool_max_tokens": args.tool_max_tokens, "concurrency": args.concurrency,
                                           "threads": args.threads, "seed": args.seed, "temperature": 0,
                                           "rounds": args.rounds, "c1_prompts": args.c1_prompts or args.num_prompts},
              "schema": PERSON, "tools": TOOLS, "engines": {}}
    started = time.perf_counter()
    from server.default_model import default_model_dir

    for engine in engines:
        print(f"{engine}:", flush=True)
        flags = ["--dtype", "bfloat16", *engine_flags(engine), *args.server_arg]
        with serving(flags, Path(f"/tmp/slimserve-bench-structured-{engine}.log"), base_url=args.base_url,
                     env=thread_env(args.threads)) as server:
            r = asyncio.run(run_engine(server.base_url, prompts, trips, args.max_tokens, args.tool_max_tokens,
                                       args.concurrency, args.c1_prompts or args.num_prompts, args.rounds))
        r["c1"]["free"]["ms_per_token"] = round(1000 * r["c1"]["free"]["seconds"] / r["c1"]["free"]["output_tokens"], 2)
        result["engines"][engine] = r
        print(f"  valid {r['schema']['valid']}/{r['schema']['answers']} answers, tool calls "
              f"{r['tools']['valid']}/{r['tools']['requests']}; constraint cost c1 {100 * r['c1']['cost']:.1f}%, "
              f"c{args.concurrency} {100 * r[f'c{args.concurrency}']['cost']:.1f}%", flush=True)
        if "grammar_profile" not in result:  # where the time goes: the grammar's own work per token
            result["grammar_profile"] = grammar_profile(r["answers"], default_model_dir(Path.home() / ".cache"
                                                                                          / "slimserve"))
            print(f"grammar per token (in-process replay): {result['grammar_profile']}", flush=True)
        result["cpu"]["load_avg_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
        result["seconds"] = round(time.perf_counter() - started, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)  # after each engine: a later failure keeps these
        args.out.write_text(json.dumps(result, indent=2))
        plot(result, args.out.with_suffix(".png"))
        print(f"wrote {args.out} and {args.out.with_suffix('.png')}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
