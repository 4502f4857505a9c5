"""Structured outputs and tool calls through the official openai client, on both engines: constrained
decoding makes even a tiny random model's output parse and match the schema."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Literal

import httpx
import jsonschema
import pytest
from pydantic import BaseModel, Field

from conftest import TINY

MESSAGES = [{"role": "user", "content": "What is the weather like in London?"}]


class Details(BaseModel):
    kind: Literal["rain", "sun", "fog"]
    wind: Annotated[int, Field(ge=0, le=99)]


class Weather(BaseModel):
    city: Annotated[str, Field(max_length=12)]
    sunny: bool
    details: Details
    tags: Annotated[list[Literal["warm", "cold"]], Field(max_length=3)]


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}},
                                       "required": ["zone"], "additionalProperties": False}}}


def test_parse_returns_the_pydantic_object(client):
    for temperature in (0, 1.0):
        r = client.chat.completions.parse(model=TINY, messages=MESSAGES, response_format=Weather, max_tokens=200,
                                          temperature=temperature, seed=3)
        parsed = r.choices[0].message.parsed
        assert isinstance(parsed, Weather), r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop"


def test_json_object_mode_parses(client):
    r = client.chat.completions.create(model=TINY, messages=MESSAGES, response_format={"type": "json_object"},
                                       max_tokens=200, temperature=0)
    if r.choices[0].finish_reason == "stop":  # an open object may run past max_tokens; a finished one parses
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    assert r.choices[0].message.content.lstrip().startswith("{")


def test_streamed_json_schema_equals_non_streamed(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": Weather.model_json_schema()}}
    kw = dict(model=TINY, messages=MESSAGES, response_format=fmt, max_tokens=200, temperature=0)
    full = client.chat.completions.create(**kw).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                       if c.choices)
    assert streamed == full
    Weather.model_validate_json(full)


def test_forced_tool_calls_are_valid_for_their_schema(client):
    r = client.chat.completions.create(model=TINY, messages=MESSAGES, tools=[WEATHER_TOOL, TIME_TOOL],
                                       tool_choice="required", max_tokens=300, temperature=0.8, seed=5)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER_TOOL, TIME_TOOL)}
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    named = client.chat.completions.create(model=TINY, messages=MESSAGES, tools=[WEATHER_TOOL, TIME_TOOL],
                                           tool_choice={"type": "function", "function": {"name": "get_time"}},
                                           max_tokens=60, temperature=0)
    [call] = named.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    assert json.loads(call.function.arguments)["zone"] in ("utc", "cet")


def test_streamed_tool_calls_in_openai_shape(client):
    stream = client.chat.completions.create(model=TINY, messages=MESSAGES, tools=[WEATHER_TOOL],
                                            tool_choice="required", parallel_tool_calls=False, max_tokens=200,
                                            temperature=0, stream=True)
    chunks = [c for c in stream if c.choices]
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls and calls[0].index == 0 and calls[0].function.name == "get_weather"
    json.loads(calls[0].function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_history_is_accepted(client):
    history = [*MESSAGES,
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\": \"London\", \"unit\": \"c\"}"}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "12 degrees, rain"}]
    r = client.chat.completions.create(model=TINY, messages=history, tools=[WEATHER_TOOL], max_tokens=8,
                                       temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_constrained_and_free_rows_share_a_batch(async_client):
    async def run():
        free = dict(model=TINY, messages=MESSAGES, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
        alone = (await async_client.chat.completions.create(**free)).choices[0].message.content
        together = await asyncio.gather(
            async_client.chat.completions.create(**free),
            async_client.chat.completions.parse(model=TINY, messages=MESSAGES, response_format=Weather,
                                                max_tokens=200, temperature=0),
            async_client.chat.completions.create(**free))
        return alone, together

    alone, (a, parsed, b) = asyncio.run(run())
    assert a.choices[0].message.content == b.choices[0].message.content == alone
    assert isinstance(parsed.choices[0].message.parsed, Weather)


def test_logit_bias_and_min_p(client, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    target = tok.encode(" Paris", add_special_tokens=False)[-1]
    r = client.chat.completions.create(model=TINY, messages=MESSAGES, max_tokens=3, temperature=0,
                                       logit_bias={str(target): 100}, extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == tok.decode([target] * 3)
    # min_p 1.0 keeps only the most likely token: sampling then equals greedy
    greedy = client.chat.completions.create(model=TINY, messages=MESSAGES, max_tokens=8, temperature=0,
                                            extra_body={"ignore_eos": True}).choices[0].message.content
    sampled = client.chat.completions.create(model=TINY, messages=MESSAGES, max_tokens=8, temperature=1.5, seed=1,
                                             extra_body={"ignore_eos": True, "min_p": 1.0})
    assert sampled.choices[0].message.content == greedy


def test_openai_fields_not_acted_on_are_accepted_and_named(http):
    body = {"model": TINY, "messages": MESSAGES, "max_tokens": 2, "metadata": {"k": "v"}, "store": False,
            "service_tier": "auto", "reasoning_effort": "low", "parallel_tool_calls": True, "frobnicate": 1}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["x-slimserve-ignored-fields"] == "frobnicate, metadata, reasoning_effort, service_tier, store"


def test_an_unknown_field_named_outside_latin1_is_percent_encoded_in_the_header(http):
    # Found by the fuzz test: the header line is latin-1, a field name is any JSON string.
    r = http.post("/v1/chat/completions", json={"model": TINY, "messages": MESSAGES, "max_tokens": 1, "\u0100\n": 1})
    assert r.status_code == 200, r.text
    assert r.headers["x-slimserve-ignored-fields"] == "%C4%80%0A"


def test_a_schema_that_cannot_be_enforced_is_400(http):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    r = http.post("/v1/chat/completions", json={"model": TINY, "messages": MESSAGES, "response_format": fmt,
                                               "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"


def test_strict_fields_restores_the_400(start_server, tiny_model_dir):
    strict = start_server(["--model", str(tiny_model_dir), "--served-model-name", TINY, "--strict-fields"])
    r = httpx.post(strict.base_url + "/v1/chat/completions",
                   json={"model": TINY, "messages": MESSAGES, "frobnicate": 1, "metadata": {}})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "frobnicate"
    ok = httpx.post(strict.base_url + "/v1/chat/completions",
                    json={"model": TINY, "messages": MESSAGES, "max_tokens": 1, "metadata": {}})
    assert ok.status_code == 200  # OpenAI's own fields stay accepted


@pytest.mark.parametrize("text, expected", [
    ('<tool_call>{"name": "get_time", "arguments": {"zone": "utc"}}</tool_call>', ("get_time", {"zone": "utc"})),
    ('{"name": "get_time", "parameters": {"zone": "cet"}}', ("get_time", {"zone": "cet"})),
    ('[TOOL_CALLS] [{"name": "get_time", "arguments": {"zone": "utc"}}]', ("get_time", {"zone": "utc"})),
    ("It is noon.", None),
    ('<tool_call>{"name": "not_a_tool", "arguments": {}}</tool_call>', None),
])
def test_tool_call_formats_are_parsed(text, expected):
    from server.answers.tools import parse_calls
    from server.protocol import ChatCompletionRequest

    body = ChatCompletionRequest(model="m", messages=MESSAGES, tools=[TIME_TOOL])
    content, calls = parse_calls(text, body)
    if expected is None:
        assert calls is None and content == text
    else:
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [expected]
