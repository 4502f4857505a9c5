"""The embedded default model, SmolLM2-135M-Instruct, served by `slimserve serve` with no --model."""

from __future__ import annotations

import os

import pytest

MODEL = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def smollm(start_server, tmp_path_factory):
    # The conversion is cached across runs; tests share the user's cache unless told otherwise.
    env = {}
    if "SLIMSERVE_CACHE_DIR" in os.environ:
        env["SLIMSERVE_CACHE_DIR"] = os.environ["SLIMSERVE_CACHE_DIR"]
    return start_server([], env=env, timeout=600)


@pytest.fixture(scope="module")
def smollm_client(smollm):
    import openai

    return openai.OpenAI(base_url=smollm.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.mark.slow
def test_default_model_is_listed(smollm_client):
    assert [m.id for m in smollm_client.models.list().data] == [MODEL]


@pytest.mark.slow
def test_capital_of_france_is_paris(smollm_client):
    r = smollm_client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0)
    assert "Paris" in r.choices[0].message.content


@pytest.mark.slow
def test_capital_of_france_streamed(smollm_client):
    stream = smollm_client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0,
                                                   stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert "Paris" in text
