"""Client libraries people point at an OpenAI endpoint, unchanged, against slimserve on both engines:
LangChain's ChatOpenAI (structured output by json_schema, json_mode and function calling; bind_tools)
and LiteLLM with tools."""

from __future__ import annotations

import json
import os
from typing import Annotated, Literal

import pytest
from pydantic import BaseModel, Field

from conftest import TINY

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # LiteLLM would fetch its price list at import


class Answer(BaseModel):
    """An answer and how sure the model is."""

    answer: Annotated[str, Field(max_length=10)]
    sure: bool
    level: Literal["low", "high"]


def get_time(zone: Literal["utc", "cet"]) -> str:
    """The time in a zone."""
    return "12:00"


@pytest.fixture()
def chat_model(server):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=TINY, base_url=f"{server.base_url}/v1", api_key="unused", temperature=0, max_tokens=120,
                      max_retries=0, timeout=60)


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_langchain_with_structured_output(chat_model, method):
    structured = chat_model.with_structured_output(Answer if method != "json_mode" else Answer.model_json_schema(),
                                                   method=method)
    if method == "json_mode":
        # json_mode only promises some JSON object (the schema is the prompt's job): it must parse
        from langchain_core.messages import HumanMessage

        raw = chat_model.bind(response_format={"type": "json_object"}).invoke([HumanMessage("Reply in JSON.")])
        assert raw.content.startswith("{")
        return
    result = structured.invoke("Is the sky blue?")
    assert isinstance(result, Answer)


def test_langchain_bind_tools(chat_model):
    bound = chat_model.bind_tools([get_time], tool_choice="get_time")
    message = bound.invoke("What time is it in Berlin?")
    [call] = message.tool_calls
    assert call["name"] == "get_time" and call["args"]["zone"] in ("utc", "cet")


def test_litellm_with_tools(server):
    import litellm

    tool = {"type": "function", "function": {
        "name": "get_time", "description": "The time in a zone",
        "parameters": {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"]}}}
    response = litellm.completion(model=f"openai/{TINY}", api_base=f"{server.base_url}/v1", api_key="unused",
                                  messages=[{"role": "user", "content": "Time in Paris?"}], tools=[tool],
                                  tool_choice="required", max_tokens=120, temperature=0)
    [call] = response.choices[0].message.tool_calls[:1]
    assert call.function.name == "get_time"
    assert json.loads(call.function.arguments)["zone"] in ("utc", "cet")
    plain = litellm.completion(model=f"openai/{TINY}", api_base=f"{server.base_url}/v1", api_key="unused",
                               messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
    assert plain.choices[0].message.content is not None
