"""A model served by another OpenAI-compatible server (another slimserve, raw vLLM, ...).

It answers whole OpenAI requests rather than token ids: the request body goes upstream with the
model name swapped, the answer (or each streamed chunk) comes back with ours. Upstream errors pass
through with their status; a refused connection marks the upstream down for a while so the router
can fall back instead of waiting on it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import AsyncIterator

import httpx

from server.engines.base import EngineStats
from server.engines.base import EngineCapabilities
from server.errors import APIError, Overloaded
from server.model_config import ModelEntry

log = logging.getLogger(__name__)
PATHS = {"chat": "/chat/completions", "completions": "/completions"}


class UpstreamUnavailable(Overloaded):
    """The upstream could not be reached; nothing was sent to the client yet, so a fallback is safe."""

    def __init__(self, name: str, why: str):
        super().__init__(f"the upstream of model '{name}' is unavailable: {why}", code="upstream_unavailable")


class UpstreamTimeout(APIError):
    """The upstream stopped answering within the timeout (the HTTP layer says 504)."""


class UpstreamError(APIError):
    """An error answer from upstream, passed through with its status and (OpenAI-shaped) body."""

    def __init__(self, status: int, payload: object, name: str):
        err = payload.get("error") if isinstance(payload, dict) else None
        if isinstance(err, dict) and "message" in err:
            message, self.error_type = str(err["message"]), str(err.get("type") or "upstream_error")
            param, code = err.get("param"), err.get("code")
        else:
            message, param, code = f"upstream of '{name}' answered {status}", None, None
            self.error_type = "upstream_error"
        super().__init__(message, param=param, code=code)
        self.status = status if 400 <= status < 600 else 502


class RemoteEngine:
    capabilities = EngineCapabilities(local=False, adapters=False, tokenizer=False)
    def __init__(self, name: str, base_url: str, *, api_key: str | None = None, upstream_model: str | None = None,
                 timeout: float = 120.0, unhealthy_seconds: float = 10.0):
        self.model_id = name
        self.base_url = base_url.rstrip("/")
        self.source = self.base_url
        self.upstream_model = upstream_model or name
        self.quantization = None
        self.sampling_defaults: dict = {}  # the upstream applies its own
        self.weight_bytes = 0
        self.max_model_len = 0  # unknown here; the upstream checks its own context length
        self.unhealthy_seconds = unhealthy_seconds
        self._headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = httpx.Timeout(timeout, connect=min(5.0, timeout))
        self._client: httpx.AsyncClient | None = None
        self._down_until = 0.0
        self._in_flight = 0

    @classmethod
    def from_entry(cls, entry: ModelEntry, unhealthy_seconds: float = 10.0) -> "RemoteEngine":
        key = os.environ.get(entry.api_key_env) if entry.api_key_env else None
        if entry.api_key_env and key is None:
            log.warning("model %s: environment variable %s is not set; calling upstream without a key",
                        entry.name, entry.api_key_env)
        return cls(entry.name, entry.base_url, api_key=key, upstream_model=entry.upstream_model, timeout=entry.timeout,
                   unhealthy_seconds=unhealthy_seconds)

    # ---- lifecycle and health ------------------------------------------------------------------
    async def start(self) -> None:
        self._client = httpx.AsyncClient(base_url=self.base_url, headers=self._headers, timeout=self._timeout)

    async def shutdown(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    def health(self) -> bool:
        return time.monotonic() >= self._down_until

    def stats(self) -> EngineStats:
        return EngineStats(running=self._in_flight, waiting=0)

    def _mark_down(self, why: str) -> UpstreamUnavailable:
        self._down_until = time.monotonic() + self.unhealthy_seconds
        log.warning("upstream of %s (%s) is down: %s", self.model_id, self.base_url, why)
        return UpstreamUnavailable(self.model_id, why)

    # ---- requests ------------------------------------------------------------------------------
    def _payload(self, body: dict) -> dict:
        return {**body, "model": self.upstream_model}

    async def complete(self, kind: str, body: dict) -> dict:
        self._in_flight += 1
        try:
            response = await self._send(kind, body, stream=False)
            try:
                data = response.json()
            except ValueError as exc:
                raise UpstreamError(max(response.status_code, 502), None, self.model_id) from exc
            finally:
                await response.aclose()
            if response.status_code >= 400:
                raise UpstreamError(response.status_code, data, self.model_id)
            data["model"] = self.model_id
            return data
        finally:
            self._in_flight -= 1

    async def open_stream(self, kind: str, body: dict) -> AsyncIterator[dict]:
        """Connect and check the status first, so errors are HTTP errors, not broken streams."""
        self._in_flight += 1
        try:
            response = await self._send(kind, {**body, "stream": True}, stream=True)
            if response.status_code >= 400:
                raw = await response.aread()
                await response.aclose()
                try:
                    payload = json.loads(raw)
                except ValueError:
                    payload = None
                raise UpstreamError(response.status_code, payload, self.model_id)
        except BaseException:
            self._in_flight -= 1
            raise
        return self._events(response)

    async def _events(self, response: httpx.Response) -> AsyncIterator[dict]:
        try:
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:  # an error the upstream reported in-band, after its headers
                    raise UpstreamError(500, event, self.model_id)
                event["model"] = self.model_id
                yield event
        except httpx.ReadTimeout as exc:
            raise UpstreamTimeout(f"the upstream of '{self.model_id}' stopped sending for too long") from exc
        except httpx.TransportError as exc:
            raise UpstreamError(502, {"error": {"message": f"upstream stream broke: {type(exc).__name__}",
                                                "type": "upstream_error"}}, self.model_id) from exc
        finally:
            self._in_flight -= 1
            await response.aclose()  # closing early tells the upstream to abort the generation

    async def _send(self, kind: str, body: dict, *, stream: bool) -> httpx.Response:
        if self._client is None:
            raise UpstreamUnavailable(self.model_id, "not started")
        request = self._client.build_request("POST", PATHS[kind], json=self._payload(body))
        try:
            return await self._client.send(request, stream=stream)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise self._mark_down(f"{type(exc).__name__}: {exc}") from exc
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"the upstream of '{self.model_id}' did not answer within the timeout") from exc
        except httpx.TransportError as exc:
            raise self._mark_down(f"{type(exc).__name__}: {exc}") from exc
