"""The Engine interface, and the plain data that crosses it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Guide:
    """Constrained decoding: every output token keeps the text a prefix of a match. One of the two."""

    json_schema: str | None = None  # the schema as canonical JSON text (hashable: compiled grammars are cached)
    json_object: bool = False  # any JSON object


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; k: the sampled token's and the top k
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    guide: Guide | None = None
    prompt_logprobs: int | None = None  # None: none; k: each prompt token's logprob and the top k (echo)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class RequestStats:
    """Timings of one request, filled by the engine, recorded into metrics once, at the end."""

    model: str
    adapter: str = ""
    arrival: float = field(default_factory=time.perf_counter)
    scheduled: float | None = None  # left the queue
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (usage.prompt_tokens_details)
    completion_tokens: int = 0
    inter_token: list[float] = field(default_factory=list)
    finish_reason: str | None = None

    def token_emitted(self, when: float, count: int = 1) -> None:
        if self.first_token is None:
            self.first_token = when
        elif self.last_token is not None:
            self.inter_token.append(when - self.last_token)
        self.last_token = when
        self.completion_tokens += count


@dataclass
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    stats: RequestStats
    adapter: str | None = None
    adapter_slot: int | None = None  # the slot the dispatch layer holds for the request's life (else: by name)
    fault: str | None = None  # tests only (settings.fault_inject): where the engine raises, see scheduler


@dataclass
class TokenLogprob:
    token: str
    logprob: float | None  # None only for a prompt's first token, which nothing predicts
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Chunk:
    """New output of one request since its last chunk."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # stop | length | abort
    prompt_logprobs: list[TokenLogprob] | None = None  # first chunk only, when asked for: one per prompt token


@dataclass
class EngineStats:
    """The same figures from every engine, exported under the same metric names."""

    running: int
    waiting: int
    kv_cache_tokens: int = 0
    kv_cache_usage: float = 0.0  # 0..1 of the engine's KV budget
    kv_cache_bytes: int = 0  # bytes the cached tokens' keys and values occupy
    aborted: int = 0  # cumulative: sequences stopped because their client went away
    preemptions: int = 0  # cumulative
    running_adapters: int = 0  # running requests that use an adapter
    waiting_adapters: int = 0
    spec_drafts: int = 0  # cumulative, speculative decoding: drafts checked
    spec_draft_tokens: int = 0  # cumulative: tokens proposed
    spec_accepted_tokens: int = 0  # cumulative: proposed tokens the model accepted
    prefix_cache_queries: int = 0  # cumulative: prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # cumulative: prompt tokens found there (their KV reused, not computed)


@dataclass(frozen=True)
class EngineCapabilities:
    """What an engine can do, asked instead of its class: the layers above never import engine classes."""

    local: bool  # generates from token ids here (else: whole OpenAI requests go to an upstream)
    adapters: bool  # serves LoRA adapters (has adapter slots and install/uninstall)
    tokenizer: bool  # encode / decode / render_chat work here


class Engine(Protocol):
    capabilities: EngineCapabilities
    model_id: str
    max_model_len: int
    weight_bytes: int
    sampling_defaults: dict  # the model folder's generation_config sampling values, for fields a request omits

    def encode(self, prompt: str) -> list[int]: ...

    def render_chat(self, messages: list[dict], add_generation_prompt: bool, **template_kwargs) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]: ...

    def abort(self, request_id: str) -> None: ...

    def health(self) -> bool: ...

    def stats(self) -> EngineStats: ...

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...
