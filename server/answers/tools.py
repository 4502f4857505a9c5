"""Structured outputs and tool calls for chat: the decoding guide a request asks for, and the model's
text turned into OpenAI `tool_calls`.

`response_format` json_object / json_schema and a forced `tool_choice` (`required`, a named function)
are enforced by constrained decoding (engines/base.Guide), so the output always parses and matches
the schema. With `tool_choice: auto` the model writes freely and calls are parsed from the common
formats: Hermes `<tool_call>{...}</tool_call>`, Llama-3 JSON (`{"name": ..., "parameters": ...}`)
and Mistral `[TOOL_CALLS] [...]`.
"""

from __future__ import annotations

import json
import re
import uuid

from server.engines.base import Guide
from server.protocol import ChatCompletionRequest, NamedToolChoice

_ANY_OBJECT = {"type": "object"}
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def guide_for(body: ChatCompletionRequest) -> Guide | None:
    """The constraint on the answer's text, if the request asks for one."""
    if body.uses_tools() and (body.tool_choice == "required" or isinstance(body.tool_choice, NamedToolChoice)):
        return Guide(json_schema=_canonical(forced_calls_schema(body)))
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return Guide(json_object=True)
    return Guide(json_schema=_canonical(fmt.json_schema.schema_ or _ANY_OBJECT))


def forced_calls_schema(body: ChatCompletionRequest) -> dict:
    """A named function: one {"name", "arguments"} object. `required`: a non-empty array of calls to any
    of the tools (one call when parallel_tool_calls is false, else at most two per tool), as vLLM
    constrains it."""
    def call(tool) -> dict:
        return {"type": "object", "properties": {"name": {"const": tool.function.name},
                                                 "arguments": tool.function.parameters or _ANY_OBJECT},
                "required": ["name", "arguments"], "additionalProperties": False}

    tools = body.tools or []
    if isinstance(body.tool_choice, NamedToolChoice):
        return call(next(t for t in tools if t.function.name == body.tool_choice.function.name))
    one = call(tools[0]) if len(tools) == 1 else {"anyOf": [call(t) for t in tools]}
    # bounded, so that a small model cannot add calls until max_tokens cuts the JSON
    return {"type": "array", "items": one, "minItems": 1,
            "maxItems": 1 if body.parallel_tool_calls is False else min(8, 2 * len(tools))}


def parse_calls(text: str, body: ChatCompletionRequest) -> tuple[str | None, list[dict] | None]:
    """(content, tool_calls) from the model's text; tool_calls is None when it called nothing."""
    if not body.uses_tools():
        return text, None
    forced = body.tool_choice == "required" or isinstance(body.tool_choice, NamedToolChoice)
    if forced:  # constrained: the whole text is the call (or the array of calls)
        data = json.loads(text)
        return None, [_call(c) for c in (data if isinstance(data, list) else [data])]
    names = {t.function.name for t in body.tools or []}
    found = _hermes(text) or _mistral(text) or _bare_json(text)
    calls = [c for c in found if c.get("name") in names]
    if not calls:
        return text, None
    if body.parallel_tool_calls is False:
        calls = calls[:1]
    before = text.split("<tool_call>")[0].split("[TOOL_CALLS]")[0].strip()
    return (before or None), [_call(c) for c in calls]


def _call(item: dict) -> dict:
    args = item.get("arguments", item.get("parameters", {}))
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": item["name"], "arguments": args if isinstance(args, str) else json.dumps(args)}}


def _loads(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def _hermes(text: str) -> list[dict]:
    return [d for d in (_loads(m) for m in _HERMES.findall(text)) if isinstance(d, dict)]


def _mistral(text: str) -> list[dict]:
    if "[TOOL_CALLS]" not in text:
        return []
    data = _loads(text.split("[TOOL_CALLS]", 1)[1].strip())
    return [d for d in (data if isinstance(data, list) else [data]) if isinstance(d, dict)]


def _bare_json(text: str) -> list[dict]:
    data = _loads(text.strip())
    items = data if isinstance(data, list) else [data]
    return [d for d in items if isinstance(d, dict) and "name" in d and ("arguments" in d or "parameters" in d)]


def _canonical(schema: dict) -> str:
    return json.dumps(schema, sort_keys=True, separators=(",", ":"))
