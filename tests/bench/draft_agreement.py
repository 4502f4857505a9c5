"""How often a quantized copy of the model picks the model's own greedy token (teacher-forced): the
acceptance ceiling of self-speculation (speculative_config method quantized_self, self_draft.py).

    python -m tests.bench.draft_agreement --prompts /tmp/rt/heldout.jsonl [--dtype bfloat16]

For each prompt the model answers greedily (--max-tokens); then the model and each copy (int4, int8 on
slimserve's kernels, as the draft is built) score prompt + answer in one forward, and the share of
answer positions where the copy's argmax equals the model's is counted. Writes
tests/bench/figures/draft_agreement_smollm2.json with the CPU named.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from compress.router_calibration import prompts_of
from server.default_model import DEFAULT_MODEL_ID
from server.engines.torch.self_draft import build_draft_model
from tests.bench.machine import describe, summary
from tests.bench.models import local_model
from tests.bench.output import write_result

FIGURES = Path(__file__).parent / "figures"


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT_MODEL_ID)
    ap.add_argument("--prompts", type=Path, required=True)
    ap.add_argument("--num-prompts", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", type=Path, default=FIGURES / "draft_agreement_smollm2.json")
    args = ap.parse_args(argv)
    path = local_model(args.model)
    cpu = describe()
    print(f"CPU: {summary(cpu)}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()
    copies = {method: build_draft_model(model, method) for method in ("int4", "int8")}
    same = dict.fromkeys(copies, 0)
    total = 0
    with torch.inference_mode():
        for prompt in tqdm(prompts_of(args.prompts)[: args.num_prompts], desc="prompts"):
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
            full = model.generate(ids, max_new_tokens=args.max_tokens, do_sample=False)
            n = ids.shape[1]
            want = model(full).logits[0, n - 1:-1].argmax(-1)
            total += want.numel()
            for method, c in copies.items():
                same[method] += int((c(full).logits[0, n - 1:-1].argmax(-1) == want).sum())
    result = {"model": args.model, "cpu": cpu, "dtype": args.dtype, "prompts": str(args.prompts),
              "num_prompts": args.num_prompts, "max_tokens": args.max_tokens, "positions": total,
              "agreement": {m: same[m] / total for m in copies}}
    for method in copies:
        print(f"{method} copy: the model's greedy token at {same[method]}/{total} positions "
              f"({same[method] / total:.1%})")
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
