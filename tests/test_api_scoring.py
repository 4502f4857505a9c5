"""Prompt scoring through /v1/completions (`echo` + `logprobs`, `max_tokens: 0`), the way lm-eval's
`local-completions` reads it, on both engines, checked against transformers' own log-probabilities."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import TINY

TEXT = "Servers batch requests so that one pass over the weights serves many rows"


def _reference(tiny_model_dir, ids: list[int]) -> list[float]:
    """transformers' log-probability of each prompt token after the first (float32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    return logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


@pytest.fixture(scope="module")
def prompt_ids(tiny_model_dir) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir).encode(TEXT)


def test_echo_logprobs_cover_the_prompt_then_the_output(client, tiny_model_dir, prompt_ids):
    r = client.completions.create(model=TINY, prompt=prompt_ids, max_tokens=3, temperature=0, echo=True,
                                  logprobs=2, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    n = len(prompt_ids)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    ref = _reference(tiny_model_dir, prompt_ids)
    got = lp.token_logprobs[1:n]
    assert all(math.isfinite(x) for x in got)
    assert sum(got) == pytest.approx(sum(ref), rel=1e-3, abs=1e-3)
    assert got == pytest.approx(ref, abs=2e-3)
    for token, value, top in zip(lp.tokens[1:n], got, lp.top_logprobs[1:n]):
        assert top[token] == pytest.approx(value)  # the prompt token is among its own top entries
        assert max(top.values()) >= value - 1e-6
    # the generated part is what the same request without echo returns
    plain = client.completions.create(model=TINY, prompt=prompt_ids, max_tokens=3, temperature=0, logprobs=2,
                                      extra_body={"ignore_eos": True}).choices[0].logprobs
    assert lp.token_logprobs[n:] == pytest.approx(plain.token_logprobs, abs=1e-4)


def test_max_tokens_zero_with_echo_scores_without_generating(client, tiny_model_dir, prompt_ids):
    r = client.completions.create(model=TINY, prompt=[prompt_ids, prompt_ids[:5]], max_tokens=0, temperature=0,
                                  echo=True, logprobs=1)
    assert r.usage.completion_tokens == 0
    first, second = r.choices
    assert len(first.logprobs.token_logprobs) == len(prompt_ids)
    assert len(second.logprobs.token_logprobs) == 5
    ref = _reference(tiny_model_dir, prompt_ids)
    assert sum(first.logprobs.token_logprobs[1:]) == pytest.approx(sum(ref), rel=1e-3, abs=1e-3)
    assert first.text == TEXT or first.text.strip() == TEXT.strip()


def test_max_tokens_zero_needs_echo(http):
    r = http.post("/v1/completions", json={"model": TINY, "prompt": "Hello", "max_tokens": 0})
    assert r.status_code == 400 and "echo" in r.json()["error"]["message"]


def test_streamed_echo_carries_the_prompt_logprobs(client, prompt_ids):
    kw = dict(model=TINY, prompt=prompt_ids, max_tokens=4, temperature=0, echo=True, logprobs=1,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0]
    chunks = [c for c in client.completions.create(stream=True, **kw) if c.choices]
    assert "".join(c.choices[0].text for c in chunks) == full.text
    streamed = [v for c in chunks if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None
    assert streamed[1:] == pytest.approx(full.logprobs.token_logprobs[1:], abs=1e-4)
