"""OpenAI wire models, in OpenAI's field order, and their translation to engine sampling parameters.

Fields OpenAI defines that slimserve does not act on (metadata, store, service_tier, ...) are accepted
and named back in the `x-slimserve-ignored-fields` header, as are fields nobody defines; with the
setting `strict_fields` unknown ones are refused (400 naming the field) instead.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.engines.base import Guide, SamplingParams
from server.engines.generation_defaults import SAMPLING_DEFAULT_FIELDS
from server.errors import BadRequest
from server.request_context import current

MAX_STOP = 64  # hard cap in the schema; settings.max_stop is the server's own bound
MAX_TOP_LOGPROBS = 20
MAX_TOKEN_ID = 2**31 - 1  # beyond int32, torch and vLLM overflow (found by tests/test_fuzz_api.py)
# OpenAI request fields that do not change the answer here: accepted, ignored, named in a header
IGNORED_OPENAI_FIELDS = frozenset({
    "metadata", "store", "service_tier", "prompt_cache_key", "prompt_cache_retention", "safety_identifier",
    "reasoning_effort", "verbosity", "modalities", "audio", "prediction", "web_search_options", "user"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id ... pass through to the template

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class _SamplingFields(BaseModel):
    """Fields shared by chat and completions requests."""

    model_config = ConfigDict(extra="allow")  # unknown fields: ignored and named back, or refused (strict)

    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(None, max_length=1024)
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=128)  # the server's own bound: settings.max_n
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    user: str | None = None
    # vLLM extensions
    top_k: int = Field(-1, ge=-1, le=MAX_TOKEN_ID)
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    stop_token_ids: list[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]] | None = Field(None, max_length=64)
    ignore_eos: bool = False

    # The configured bounds of this server (settings: `# limits (hardening)`), from the request context.
    @field_validator("stop")
    @classmethod
    def _stop_limits(cls, value):
        limits = current().limits
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > limits.max_stop:
            raise ValueError(f"at most {limits.max_stop} stop sequences")
        if any(len(s) > limits.max_stop_chars for s in stops):
            raise ValueError(f"stop sequences must be at most {limits.max_stop_chars} characters")
        return value

    @field_validator("model", check_fields=False)
    @classmethod
    def _log_model(cls, value: str) -> str:
        current().model = value  # for the request log and the refusal metrics, even if another field fails
        return value

    @field_validator("n")
    @classmethod
    def _n_limit(cls, value: int) -> int:
        if value > current().limits.max_n:
            raise ValueError(f"n must be at most {current().limits.max_n}")
        return value

    @field_validator("max_tokens", "max_completion_tokens", check_fields=False)
    @classmethod
    def _max_tokens_limit(cls, value: int | None) -> int | None:
        if value is not None and value > current().limits.max_tokens:
            raise ValueError(f"must be at most {current().limits.max_tokens}")
        return value

    @model_validator(mode="after")
    def _check(self):
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        if self.logit_bias and not all(k.isdigit() and int(k) <= MAX_TOKEN_ID for k in self.logit_bias):
            raise ValueError("logit_bias keys must be token ids")
        unknown = sorted(set(self.model_extra or {}) - IGNORED_OPENAI_FIELDS)
        if unknown and current().limits.strict_fields:
            raise StrictFieldError(unknown[0])
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def ignored_fields(self) -> list[str]:
        """Fields the client sent that do not change the answer (for the x-slimserve-ignored-fields header)."""
        given = set(self.model_extra or {}) | ({"user"} if self.user is not None else set())
        return sorted(given)

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling(self, max_tokens: int, logprobs: int | None, index: int, defaults: dict | None = None,
                 prompt_logprobs: int | None = None, guide: Guide | None = None) -> SamplingParams:
        """Engine parameters for choice `index`. `defaults` (the model's generation_config) fill the
        sampling fields this request left out, as vLLM does."""
        given = self.model_fields_set
        pick = {k: (getattr(self, k) if k in given or k not in (defaults or {}) else defaults[k])
                for k in SAMPLING_DEFAULT_FIELDS}
        # n > 1 with a seed: each choice gets its own, derived seed, so choices differ but replay.
        seed = None if self.seed is None else (self.seed + index) % 2**63
        return SamplingParams(
            max_tokens=max_tokens,
            # as vLLM: below 1e-5 is greedy (a temperature of 1e-51 overflowed the logits: found by fuzzing)
            temperature=0.0 if pick["temperature"] < 1e-5 else pick["temperature"],
            top_p=pick["top_p"],
            top_k=pick["top_k"],
            min_p=pick["min_p"],
            prompt_logprobs=prompt_logprobs,
            logit_bias={int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
            guide=guide,
            seed=seed,
            stop=self.stop_list(),
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=pick["repetition_penalty"],
        )


class JSONSchemaFormat(_Strict):
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object")
        return self


class FunctionDefinition(_Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class _FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"] = "function"
    function: _FunctionName


class StrictFieldError(ValueError):
    """An unknown field under strict_fields; its name becomes the error's `param`."""

    def __init__(self, field: str):
        super().__init__("unknown field (this server runs with strict_fields)")
        self.field = field


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    model: str
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # vLLM extensions
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check_chat(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = {t.function.name for t in self.tools or []}
            if self.tool_choice.function.name not in names:
                raise ValueError(f"tool_choice names '{self.tool_choice.function.name}', which is not in tools")
        if self.tool_choice == "required" and not self.tools:
            raise ValueError("tool_choice 'required' needs tools")
        if self.uses_tools() and self.response_format is not None and self.response_format.type != "text":
            raise ValueError("response_format cannot be combined with a forced tool_choice")
        return self

    def uses_tools(self) -> bool:
        """Tools are offered (and the output is parsed for calls) unless tool_choice is none."""
        return bool(self.tools) and self.tool_choice != "none"

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def template_messages(self) -> list[dict]:
        """The messages as the chat template reads them: text parts joined, extra fields kept."""
        return [{**m.model_dump(exclude_none=True), "content": m.text()} for m in self.messages]

    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_SamplingFields):
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    best_of: int | None = Field(None, ge=1, le=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    max_tokens: int | None = Field(16, ge=0)  # 0 with echo: score the prompt, generate nothing (as vLLM)
    suffix: str | None = None

    @model_validator(mode="after")
    def _check_completion(self):
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 is only allowed with echo: true (scoring the prompt)")
        if isinstance(self.prompt, list) and len(self.prompt) == 0:
            raise ValueError("prompt must not be empty")
        if len(self.prompts()) * self.n > 64:  # prompts, not tokens: a token-id prompt is one prompt
            raise ValueError("at most 64 choices (prompts x n) per request")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def prompt_logprobs(self) -> int | None:
        """With echo, logprobs covers the prompt's tokens too (OpenAI's legacy scoring, lm-eval)."""
        return self.logprobs if self.echo else None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; `prompt_tokens_details.cached_tokens` as OpenAI and vLLM report prefix hits."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def require(condition: bool, message: str, param: str | None = None) -> None:
    if not condition:
        raise BadRequest(message, param=param)
