"""Prompt handling both engines share: encoding, decoding and the chat template of an HF tokenizer."""

from __future__ import annotations

from server.engines.tool_prompt import inline_tools, template_takes_tools
from server.errors import BadRequest


class HFTokenizing:
    """Mixin: needs `self.tokenizer` (a transformers tokenizer) and `self.model_id`."""

    tokenizer: object
    model_id: str

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=True)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
                    **template_kwargs) -> list[int]:
        template = getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise BadRequest(f"model {self.model_id} has no chat template; use /v1/completions", param="messages")
        if tools and template_takes_tools(template if isinstance(template, str) else str(template)):
            template_kwargs["tools"] = tools
        elif tools or any(m.get("role") == "tool" or m.get("tool_calls") for m in messages):
            messages = inline_tools(messages, tools or [])
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt,
                                                      **template_kwargs)
        except Exception as exc:  # jinja raises its own errors for messages the template refuses
            raise BadRequest(f"chat template failed: {exc}", param="messages") from exc
        return self.tokenizer.encode(text, add_special_tokens=False)
