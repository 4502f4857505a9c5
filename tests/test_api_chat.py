"""Chat completions through the official openai client against a real server process."""

from __future__ import annotations

import asyncio

from conftest import TINY

MESSAGES = [{"role": "user", "content": "Hello, how are you today?"}]


def _chat(client, **kw):
    return client.chat.completions.create(model=TINY, messages=MESSAGES, **kw)


def test_chat_returns_text_usage_and_finish_reason(client):
    r = _chat(client, max_tokens=12, temperature=0)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == TINY
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0
    assert 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_max_tokens_is_respected(client):
    r = _chat(client, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5
    assert r.choices[0].finish_reason == "length"


def test_streamed_text_equals_non_streamed_under_greedy(client):
    full = _chat(client, max_tokens=24, temperature=0)
    stream = _chat(client, max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True})
    parts, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(parts) == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens


def test_concurrent_greedy_requests_match_sequential(client, async_client):
    prompts = [f"Tell me about number {i}. " * (1 + i % 4) for i in range(16)]

    def messages(p):
        return [{"role": "user", "content": p}]

    sequential = [
        client.chat.completions.create(model=TINY, messages=messages(p), max_tokens=16, temperature=0)
        .choices[0].message.content
        for p in prompts
    ]

    async def run_all():
        calls = [async_client.chat.completions.create(model=TINY, messages=messages(p), max_tokens=16, temperature=0)
                 for p in prompts]
        return [r.choices[0].message.content for r in await asyncio.gather(*calls)]

    concurrent = asyncio.run(run_all())
    assert concurrent == sequential


def test_seeded_sampling_is_reproducible_and_seeds_differ(client):
    a = _chat(client, max_tokens=16, temperature=1.0, seed=1234).choices[0].message.content
    b = _chat(client, max_tokens=16, temperature=1.0, seed=1234).choices[0].message.content
    c = _chat(client, max_tokens=16, temperature=1.0, seed=4321).choices[0].message.content
    assert a == b
    assert a != c


def test_stop_string_cuts_the_output(client):
    full = _chat(client, max_tokens=24, temperature=0, extra_body={"ignore_eos": True}).choices[0].message.content
    assert len(full) > 6
    stop = full[3:6]
    cut = _chat(client, max_tokens=24, temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    text = cut.choices[0].message.content
    assert cut.choices[0].finish_reason == "stop"
    assert stop not in text
    assert full.startswith(text) and len(text) <= full.index(stop)


def test_stop_string_in_stream_never_leaks(client):
    full = _chat(client, max_tokens=24, temperature=0, extra_body={"ignore_eos": True}).choices[0].message.content
    stop = full[4:7]
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in _chat(client, max_tokens=24, temperature=0, stop=stop, stream=True,
                       extra_body={"ignore_eos": True})
        if c.choices
    )
    assert streamed == full[: full.index(stop)]


def test_logprobs_with_top_logprobs(client):
    r = _chat(client, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for item in content:
        assert item.logprob <= 0
        assert len(item.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert abs(item.top_logprobs[0].logprob - item.logprob) < 1e-4


def test_n_choices(client):
    r = _chat(client, max_tokens=6, temperature=1.0, n=3, seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2]


def test_greedy_matches_transformers_and_stop_token_ids(client, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    prompt = tok.encode("Hello, world!")
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, min_new_tokens=10)
    ref = out[0, len(prompt):].tolist()
    full = client.completions.create(model=TINY, prompt=prompt, max_tokens=10, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert full.choices[0].text.rstrip("\ufffd") == tok.decode(ref, skip_special_tokens=True).rstrip("\ufffd")
    k = next(i for i in range(1, len(ref)) if ref[i] not in ref[:i])  # first token id not seen before
    cut = client.completions.create(model=TINY, prompt=prompt, max_tokens=10, temperature=0,
                                    extra_body={"ignore_eos": True, "stop_token_ids": [ref[k]]})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens == k + 1


def test_usage_reports_prompt_tokens_served_from_the_prefix_cache(client, engine):
    """usage.prompt_tokens_details.cached_tokens, as OpenAI and vLLM report it: 0 the first time a long
    system prompt is seen, most of it the second time (the PyTorch engine caches 16-token blocks;
    vLLM's CPU build its own block size, so only a count within the prompt is asserted there)."""
    system = "You answer questions about the weather in one short sentence. " * 30
    asks = [f"What is the weather like on day {i}?" for i in range(2)]
    first, second = [client.chat.completions.create(
        model=TINY, max_tokens=2, temperature=0,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": ask}]) for ask in asks]
    for r in (first, second):
        assert 0 <= r.usage.prompt_tokens_details.cached_tokens < r.usage.prompt_tokens
    if engine == "torch":
        assert second.usage.prompt_tokens_details.cached_tokens >= second.usage.prompt_tokens - 32
        stream = client.chat.completions.create(
            model=TINY, max_tokens=2, temperature=0, stream=True, stream_options={"include_usage": True},
            messages=[{"role": "system", "content": system}, {"role": "user", "content": asks[0]}])
        usage = [c.usage for c in stream if c.usage][0]
        assert usage.prompt_tokens_details.cached_tokens >= usage.prompt_tokens - 16
