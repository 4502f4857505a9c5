"""Side by side: the reference (teacher) answers against one or more models' answers to the same prompts.

Prints the exact-match rate and the share of answers sharing the first 8 words with the reference,
then a few examples.

    python -m tests.bench.router_side_by_side REF.jsonl A.jsonl [B.jsonl ...] [--limit 20 --show 6]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from compress.data import last_turn, prompt_of


def load(path: Path, limit: int) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:limit]
    return [(prompt_of(r), last_turn(r["messages"], "assistant")) for r in rows]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ref", type=Path)
    ap.add_argument("others", type=Path, nargs="+")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--show", type=int, default=6)
    args = ap.parse_args(argv)
    ref = load(args.ref, args.limit)
    others = {p.stem: load(p, args.limit) for p in args.others}
    for name, rows in others.items():
        pairs = list(zip(ref, rows))
        assert all(a[0] == b[0] for a, b in pairs), f"{name}: prompts differ from {args.ref}"
        exact = sum(a[1] == b[1] for a, b in pairs)
        head = sum(a[1].split()[:8] == b[1].split()[:8] for a, b in pairs)
        print(f"{name}: {len(pairs)} prompts, exact match {exact}, same first 8 words {head}")
    for i, (prompt, answer) in enumerate(ref[: args.show]):
        print(f"\n### {prompt}\n  teacher: {answer!r}")
        for name, rows in others.items():
            print(f"  {name}: {rows[i][1]!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
