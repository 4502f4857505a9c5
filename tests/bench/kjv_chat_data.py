"""Chat training data for the style demonstration: questions about a topic, answered in King James verse.

Reads the KJV text from Debian's `bible-kjv` (`bible -f`), or from a file of "Ref text" lines, and
writes JSONL chat rows: a user asks about a topic, the assistant answers with verses naming it.

    python -m tests.bench.kjv_chat_data --out kjv_chat.jsonl [--range Gen1:1-Deu34:12]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
from pathlib import Path

TOPICS = ["sea", "water", "light", "darkness", "land", "king", "night", "bread", "wine", "gold", "silver",
          "river", "mountain", "tree", "fire", "cattle", "house", "brother", "wife", "servant", "sheep", "field",
          "heaven", "cloud", "rain", "wind", "stone", "famine", "dream", "money", "sword", "garden", "journey",
          "children", "blessing", "war", "city", "morning", "evening", "food"]
TEMPLATES = ["Tell me about the {t}.", "What can you say of {t}?", "Describe {t} for me.", "Talk about {t}.",
             "What do you know about {t}?", "Give me a thought on {t}."]


def verses(source: str | None, refs: str) -> list[str]:
    if source:
        lines = Path(source).read_text().splitlines()
    else:
        lines = subprocess.run(["bible", "-f", refs], capture_output=True, text=True, check=True).stdout.splitlines()
    return [line.split(" ", 1)[1].strip() for line in lines if " " in line]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--range", default="Gen1:1-Deu34:12")
    ap.add_argument("--source", help="a file of 'Ref text' lines instead of running `bible`")
    ap.add_argument("--per-topic", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    text = verses(args.source, args.range)
    rows = []
    for topic in TOPICS:
        pattern = re.compile(rf"\b{topic}s?\b", re.IGNORECASE)
        hits = [i for i, v in enumerate(text) if pattern.search(v)]
        rng.shuffle(hits)
        for i in hits[: args.per_topic]:
            answer = " ".join(text[i:i + 2])
            question = rng.choice(TEMPLATES).format(t=topic)
            rows.append({"messages": [{"role": "user", "content": question},
                                      {"role": "assistant", "content": answer}]})
    rng.shuffle(rows)
    args.out.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    print(f"wrote {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
