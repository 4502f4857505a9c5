"""A streamed chat's first chunk carries the assistant role together with the first generated output
(as vLLM sends it), so a client that times the first chunk measures the time to the first token."""

from __future__ import annotations

from conftest import TINY

MESSAGES = [{"role": "user", "content": "Tell me about servers."}]


def test_role_arrives_with_the_first_output(client):
    kw = dict(model=TINY, messages=MESSAGES, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw).choices[0].message.content
    chunks = [c for c in client.chat.completions.create(stream=True, **kw) if c.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].delta.role for c in chunks[1:]] == [None] * (len(chunks) - 1)  # the role once
    # the role chunk is the first token's chunk, not an empty one sent before prefill
    first_text = client.chat.completions.create(**{**kw, "max_tokens": 1}).choices[0].message.content
    assert chunks[0].choices[0].delta.content == first_text
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full


def test_every_choice_gets_its_role(client):
    chunks = [c for c in client.chat.completions.create(model=TINY, messages=MESSAGES, max_tokens=4, n=2,
                                                        temperature=0.7, seed=1, stream=True) if c.choices]
    roles = {c.choices[0].index for c in chunks if c.choices[0].delta.role == "assistant"}
    assert roles == {0, 1}
