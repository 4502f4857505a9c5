"""Tools in the prompt for chat templates that do not take them. A template that reads `tools` gets
them as they are; otherwise the tools are described in a system message in the Hermes format
(`<tool_call>` JSON), and earlier calls and results in the history are written the same way."""

from __future__ import annotations

import json

_INSTRUCTIONS = (
    "You may call functions to help with the user's request. The functions, as JSON schemas:\n"
    "<tools>\n{tools}\n</tools>\n"
    "To call a function, answer with one <tool_call></tool_call> block per call, each holding a JSON "
    'object {{"name": <function name>, "arguments": <arguments object>}}.'
)


def template_takes_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template


def inline_tools(messages: list[dict], tools: list[dict]) -> list[dict]:
    """The messages with the tools described in the (first) system message and tool turns as text."""
    described = _INSTRUCTIONS.format(tools="\n".join(json.dumps(t.get("function", t)) for t in tools))
    out: list[dict] = []
    for m in messages:
        m = dict(m)
        if m.get("role") == "assistant" and m.get("tool_calls"):
            calls = "".join(f"<tool_call>{json.dumps(_call_json(c))}</tool_call>" for c in m.pop("tool_calls"))
            m["content"] = (m.get("content") or "") + calls
        elif m.get("role") == "tool":
            m = {"role": "user", "content": f"<tool_response>{m.get('content') or ''}</tool_response>"}
        out.append(m)
    if not tools:
        return out
    if out and out[0].get("role") in ("system", "developer"):
        out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{described}".strip()}
    else:
        out.insert(0, {"role": "system", "content": described})
    return out


def _call_json(call: dict) -> dict:
    fn = call.get("function", {})
    args = fn.get("arguments", "{}")
    try:
        args = json.loads(args) if isinstance(args, str) else args
    except ValueError:
        pass
    return {"name": fn.get("name"), "arguments": args}
