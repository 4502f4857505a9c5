"""Text completions through the official openai client."""

from __future__ import annotations

from conftest import TINY


def test_completion_basic(client):
    r = client.completions.create(model=TINY, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8


def test_default_max_tokens_is_16(client):
    r = client.completions.create(model=TINY, prompt="Hello", temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16


def test_streamed_completion_equals_non_streamed(client):
    kw = dict(model=TINY, prompt="Servers batch requests", max_tokens=20, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
    assert streamed == full


def test_token_id_prompt_and_list_of_prompts(client, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "Hello, world!"
    by_text = client.completions.create(model=TINY, prompt=text, max_tokens=6, temperature=0).choices[0].text
    ids = tok.encode(text)
    by_ids = client.completions.create(model=TINY, prompt=ids, max_tokens=6, temperature=0).choices[0].text
    assert by_ids == by_text
    many = client.completions.create(model=TINY, prompt=[text, "Numbers: 1 2 3"], max_tokens=6, temperature=0)
    assert [c.index for c in many.choices] == [0, 1]
    assert many.choices[0].text == by_text


def test_echo_prefixes_the_prompt(client):
    r = client.completions.create(model=TINY, prompt="Hello there", max_tokens=3, temperature=0, echo=True)
    assert r.choices[0].text.startswith("Hello there")


def test_completion_logprobs(client):
    r = client.completions.create(model=TINY, prompt="Hello", max_tokens=4, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    # engines differ only in whether a half character at the very end is shown as U+FFFD
    assert "".join(lp.tokens).rstrip("\ufffd") == r.choices[0].text.rstrip("\ufffd")
    assert all(len(t) <= 2 for t in lp.top_logprobs)
    assert lp.text_offset[0] == 0


def test_models_lists_the_served_model(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [TINY]
    assert client.models.retrieve(TINY).id == TINY
