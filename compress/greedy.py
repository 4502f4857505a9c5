"""Greedy batched chat answers of a transformers model: the one loop behind distillation's teacher
data (`compress distill --generate`), the router calibration's answers and the bench scripts that
answer prompts in-process. Prompts are left-padded into batches, rendered with the chat template
(a plain prompt is used as-is where the tokenizer has none), and answered without sampling."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class GreedyAnswer:
    text: str  # decoded up to and including the first EOS, special tokens skipped; not stripped
    tokens: int  # new tokens up to and including the first EOS (all of them where none came)
    mean_logprob: float = 0.0  # of the chosen tokens, EOS included; 0.0 unless asked for (logprobs=True)
    min_logprob: float = 0.0


def load_generator(model_path: Path, dtype: torch.dtype | str = torch.float32):
    """(model, tokenizer) ready for `greedy_answers`: the model in eval mode, the tokenizer left-padding
    with a pad token (EOS where it has none). `FOLDER@int8` (as `compress eval`) quantizes at load
    (compress/load_time.py: torchao int8, bitsandbytes int4/nf4)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, _, method = str(model_path).partition("@")
    kwargs = {}
    if method:
        from compress.load_time import load_time_config

        kwargs = {"quantization_config": load_time_config(method, dtype), "device_map": "cpu"}
    tok = AutoTokenizer.from_pretrained(folder, padding_side="left")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs).eval()
    return model, tok


def render(tokenizer, prompt: str | list[dict]) -> str:
    """A prompt (one user turn) or a whole conversation, ready for the assistant's answer."""
    if not tokenizer.chat_template:
        if isinstance(prompt, str):
            return prompt
        raise ValueError("the tokenizer has no chat template to render a conversation with")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.inference_mode()
def greedy_answers(model, tokenizer, prompts: Sequence[str | list[dict]], max_new_tokens: int, batch_size: int, *,
                   skip: int = 0, desc: str = "answers", progress: bool = True, logprobs: bool = False,
                   min_new_tokens: int | None = None) -> Iterator[GreedyAnswer]:
    """The answer to each of `prompts[skip:]`, in order, generated `batch_size` at a time; a batch's
    answers come out together once it is done, so a caller writing them as they come can resume after
    the ones it has (`skip`). `min_new_tokens` holds EOS back that long (fixed-length runs for timing)."""
    from tqdm import tqdm

    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos = tokenizer.eos_token_id
    extra = {} if min_new_tokens is None else {"min_new_tokens": min_new_tokens}
    with tqdm(total=len(prompts), initial=skip, desc=desc, unit="prompt", disable=not progress) as bar:
        for i in range(skip, len(prompts), batch_size):
            batch = prompts[i:i + batch_size]
            enc = tokenizer([render(tokenizer, p) for p in batch], return_tensors="pt", padding=True,
                            padding_side="left", add_special_tokens=False)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                                 top_k=None, pad_token_id=tokenizer.pad_token_id, output_logits=logprobs,
                                 return_dict_in_generate=True, **extra)
            new = gen.sequences[:, enc["input_ids"].shape[1]:]
            if logprobs:
                chosen = torch.stack(gen.logits, 1).float().log_softmax(-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
            answers = []
            for row in range(len(batch)):
                ids = new[row].tolist()
                end = ids.index(eos) + 1 if eos in ids else len(ids)  # the EOS token's own logprob counts
                answers.append(GreedyAnswer(tokenizer.decode(ids[:end], skip_special_tokens=True), end))
                if logprobs:
                    lp = chosen[row, :end].tolist() or [0.0]
                    answers[-1].mean_logprob, answers[-1].min_logprob = sum(lp) / len(lp), min(lp)
            bar.update(len(batch))
            yield from answers
