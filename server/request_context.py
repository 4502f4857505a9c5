"""What one HTTP request carries across layers without threading it through every call: its id,
the limits in force, the model it asked for (for the request log) and, in tests only, a fault.

The request-log middleware opens a context per request; code below it (wire-model validators, the
engines) reads it with `current()`. Outside a request (unit tests, scripts) `current()` returns a
context with the default limits, so nothing depends on a server being there.
"""

from __future__ import annotations

import contextvars
import uuid
from dataclasses import dataclass, field

FAULTS = ("sample", "detokenize", "prefill", "step", "kill")  # see server/engines/torch/scheduler.py


@dataclass(frozen=True)
class Limits:
    """Bounded work per request and per model; built from the `# limits (hardening)` settings."""

    max_request_bytes: int = 4 << 20
    max_prompt_tokens: int | None = None
    max_tokens: int = 32768
    max_n: int = 16
    max_stop: int = 8
    max_stop_chars: int = 256
    max_waiting: int = 256
    retry_after_s: int = 1
    strict_fields: bool = False  # unknown request fields: 400 instead of ignored

    @classmethod
    def from_settings(cls, s) -> "Limits":
        return cls(max_request_bytes=s.max_request_bytes, max_prompt_tokens=s.max_prompt_tokens,
                   max_tokens=s.max_tokens_limit, max_n=s.max_n, max_stop=s.max_stop,
                   max_stop_chars=s.max_stop_chars, max_waiting=s.max_waiting, retry_after_s=s.retry_after_s,
                   strict_fields=s.strict_fields)


@dataclass
class RequestContext:
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    limits: Limits = field(default_factory=Limits)
    model: str | None = None  # set once the body names one; logged
    fault: str | None = None  # only ever set when settings.fault_inject is on
    recorded: bool = False  # the generation path records this request's metrics itself


_current: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar("slimserve_request", default=None)


def current() -> RequestContext:
    ctx = _current.get()
    return ctx if ctx is not None else RequestContext()


def enter(ctx: RequestContext) -> contextvars.Token:
    return _current.set(ctx)


def leave(token: contextvars.Token) -> None:
    _current.reset(token)
