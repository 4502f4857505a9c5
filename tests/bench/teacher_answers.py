"""Greedy answers of a model (the teacher, or a student) to a prompt JSONL, batched; resumable.

Reads rows with `prompt` (or chat `messages`, first user turn); writes JSONL rows
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


def answer(model_dir: Path, prompts: Path, out: Path, max_new_tokens: int = 48, batch_size: int = 16,
           dtype: str = "float32", limit: int | None = None) -> Path:
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [json.loads(line) for line in prompts.read_text().splitlines() if line.strip()]
    if limit:
        rows = rows[:limit]
    questions = [r.get("prompt") or r["messages"][0]["content"] for r in rows]
    done = len(out.read_text().splitlines()) if out.exists() else 0
    if done >= len(questions):
        print(f"{out}: all {len(questions)} answers present")
        return out
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with out.open("a") as f, tqdm(total=len(questions), initial=done, desc=f"answers {model_dir.name}",
                                  unit="prompt") as bar:
        for i in range(done, len(questions), batch_size):
            batch = questions[i:i + batch_size]
            texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True) for q in batch]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
            for j, ids in enumerate(gen[:, enc["input_ids"].shape[1]:]):
                text = tok.decode(ids, skip_special_tokens=True).strip()
                f.write(json.dumps({"messages": [{"role": "user", "content": batch[j]},
                                                 {"role": "assistant", "content": text}],
                                    "teacher": str(model_dir), "kind": rows[i + j].get("kind")}) + "\n")
            f.flush()
            bar.update(len(batch))
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
