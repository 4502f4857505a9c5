"""Greedy answers of a model (the teacher, or a student) to a prompt JSONL, batched; resumable.

Reads rows with `prompt` (or chat `messages`, last user turn); writes JSONL rows
`{"messages": [user, assistant], "teacher": MODEL, "kind": ...}` in input order, appending, so a
rerun continues after the rows already written.

    python -m tests.bench.teacher_answers MODEL PROMPTS.jsonl OUT.jsonl [--max-new-tokens 48 --batch-size 16]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from compress.data import prompt_of
from compress.greedy import greedy_answers, load_generator


def answer(model_dir: Path, prompts: Path, out: Path, max_new_tokens: int = 48, batch_size: int = 16,
           dtype: str = "float32", limit: int | None = None) -> Path:
    rows = [json.loads(line) for line in prompts.read_text().splitlines() if line.strip()]
    if limit:
        rows = rows[:limit]
    questions = [prompt_of(r) for r in rows]
    done = len(out.read_text().splitlines()) if out.exists() else 0
    if done >= len(questions):
        print(f"{out}: all {len(questions)} answers present")
        return out
    model, tok = load_generator(model_dir, getattr(torch, dtype))
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with out.open("a") as f:
        answers = greedy_answers(model, tok, questions, max_new_tokens, batch_size, skip=done,
                                 desc=f"answers {model_dir.name}")
        for a, row, q in zip(answers, rows[done:], questions[done:]):
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": a.text.strip()}],
                                "teacher": str(model_dir), "kind": row.get("kind")}) + "\n")
            f.flush()
    print(f"{out}: {len(questions) - done} answers in {time.time() - t0:.0f}s")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("prompts", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dtype", default="float32", help="float32 (fast on CPU) or bfloat16 (as stored)")
    ap.add_argument("--limit", type=int, help="only the first N prompts")
    args = ap.parse_args(argv)
    answer(args.model, args.prompts, args.out, args.max_new_tokens, args.batch_size, args.dtype, args.limit)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
