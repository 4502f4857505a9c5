"""Serve SmolLM2 with a trained adapter beside it and show how the adapter changes the answers.

    python -m tests.bench.style_demo --adapter kjv=/path/to/kjv-lora [--out results/style_demo.json]

Asks the base model and the adapter the same questions (greedy) and counts King-James words in each
answer, the style the demonstration adapter was trained on.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.server_arg import serving  # noqa: E402

QUESTIONS = ["Tell me about the sea.", "What should I do when I feel tired?", "Describe a city at night.",
             "How do I make friends?", "What is the best way to learn?"]
ARCHAIC = re.compile(r"\b(thee|thou|thy|thine|unto|hath|shalt|saith|ye|lo|behold|doth|art|wherefore|begat)\b",
                     re.IGNORECASE)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", required=True, help="NAME=PATH")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--out", type=Path, default=Path("results/style_demo.json"))
    args = ap.parse_args(argv)
    name = args.adapter.partition("=")[0]
    with serving(["--lora", args.adapter], Path("/tmp/slimserve-style-demo.log")) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="demo", max_retries=0, timeout=300)
        rows = []
        for q in QUESTIONS:
            row = {"question": q}
            for model in ("smollm2-135m-instruct", name):
                text = client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}],
                                                      max_tokens=args.max_tokens, temperature=0
                                                      ).choices[0].message.content
                row[model] = {"text": text, "archaic_words": len(ARCHAIC.findall(text))}
            rows.append(row)
    totals = {m: sum(r[m]["archaic_words"] for r in rows) for m in ("smollm2-135m-instruct", name)}
    for r in rows:
        print(f"\nQ: {r['question']}")
        for model in ("smollm2-135m-instruct", name):
            print(f"  [{model}] {r[model]['text'][:160]!r}")
    print(f"\nKing-James words in {len(rows)} answers: {totals}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"answers": rows, "archaic_words": totals}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
