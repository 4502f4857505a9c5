"""Bounded work: the request-body cap (an ASGI middleware) and admission of a planned request.

Per-request field limits (`max_tokens`, `n`, stop strings) are checked where the wire models are
validated (protocol.py), against the limits in the request context. What needs the tokenized
prompt or the engine's queue is checked here, in `admit()`, before any work is queued, so a
refusal is a plain 4xx even for a streamed request (whose headers have not been sent yet).
"""

from __future__ import annotations

import json

from server.errors import BadRequest, QueueFull, TooLarge
from server.http_errors import body_of, status_of
from server.request_context import current


def admit(engine, prompts: list[list[int]], choices: int) -> None:
    """Refuse token ids outside the vocabulary, prompts above max_prompt_tokens, and work beyond the
    engine's waiting-queue bound."""
    limits = current().limits
    vocab = getattr(engine, "vocab_size", None)
    if vocab is not None and any(t >= vocab for p in prompts for t in p):
        raise BadRequest(f"prompt token ids must be below the vocabulary size {vocab}", param="prompt")
    if limits.max_prompt_tokens is not None:
        longest = max((len(p) for p in prompts), default=0)
        if longest > limits.max_prompt_tokens:
            raise BadRequest(f"the prompt has {longest} tokens; this server accepts at most "
                             f"{limits.max_prompt_tokens} per prompt", param="prompt", code="prompt_too_long")
    waiting = engine.stats().waiting
    if waiting and waiting + choices > limits.max_waiting:  # an empty queue takes any one request
        raise QueueFull(f"the model '{engine.model_id}' has {waiting} requests waiting (limit "
                        f"{limits.max_waiting}); retry after {limits.retry_after_s} s", limits.retry_after_s)


class BodyLimit:
    """Reads a request body up to `max_bytes` before the app sees it; a larger one is a 413.

    Content-Length is checked first; a chunked body is counted as it arrives. The app then gets the
    buffered body, and later receive() calls go to the client (so disconnects are still seen)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                if int(declared) > self.max_bytes:
                    return await self._refuse(send)
            except ValueError:
                pass  # the server (h11/httptools) refuses a malformed length itself
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                return await self._refuse(send)
            chunks.append(body)
            more = message.get("more_body", False)
        buffered = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return buffered
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send) -> None:
        err = TooLarge(f"the request body is larger than this server's limit of {self.max_bytes} bytes",
                       code="request_too_large")
        payload = json.dumps(body_of(err)).encode()
        await send({"type": "http.response.start", "status": status_of(err),
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})
