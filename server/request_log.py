"""One log line per HTTP request, with a request id that the response returns as `x-request-id`.

The middleware takes the client's `x-request-id` when it is a sane token (else makes one), opens
the request context (limits, model, test-only fault) for the layers below, and logs method, path,
status, latency, model and id. It never logs headers, keys, query strings or bodies.
`--log-format json` makes every log record one JSON object per line.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from server.http_errors import error_body
from server.request_context import FAULTS, Limits, RequestContext, enter, leave

log = logging.getLogger("slimserve.request")
_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
FAULT_HEADER = b"x-slimserve-fault"
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")


def _count_refusal(scope, model: str | None, status: int) -> None:
    """Requests refused before an engine saw them count in slimserve_requests_total too. An unknown
    model name is counted under model="" (a client must not be able to mint label values)."""
    state = getattr(getattr(scope.get("app"), "state", None), "slim", None)
    if state is not None:
        state.metrics.refused(*state.metric_labels(model), status)


class RequestLog:
    def __init__(self, app, limits: Limits, fault_inject: bool = False):
        self.app = app
        self.limits = limits
        self.fault_inject = fault_inject

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        ctx = RequestContext(request_id=given if _ID_RE.match(given) else uuid.uuid4().hex, limits=self.limits)
        if self.fault_inject:
            fault = headers.get(FAULT_HEADER, b"").decode("latin-1")
            ctx.fault = fault if fault in FAULTS else None
        status = 500
        response_started = False

        async def send_with_id(message):
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status, response_started = message["status"], True
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", ctx.request_id.encode())]}
            await send(message)

        token = enter(ctx)
        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:  # past every handler: answer in the OpenAI shape, with the id
            log.exception("unhandled error in request %s", ctx.request_id)
            if not response_started:
                body = json.dumps(error_body(f"internal error: {type(exc).__name__}", "internal_error")).encode()
                await send_with_id({"type": "http.response.start", "status": 500,
                                    "headers": [(b"content-type", b"application/json"),
                                                (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
        finally:
            leave(token)
            if scope["path"] in GENERATION_PATHS and not ctx.recorded:
                _count_refusal(scope, ctx.model, status)
            fields = {"request_id": ctx.request_id, "method": scope["method"], "path": scope["path"],
                      "status": status, "latency_ms": round((time.perf_counter() - started) * 1000, 2),
                      "model": ctx.model}
            log.info("%s %s %s %.1f ms model=%s request_id=%s", scope["method"], scope["path"], status,
                     fields["latency_ms"], ctx.model, ctx.request_id, extra={"fields": fields})


class JSONFormatter(logging.Formatter):
    """Every record as one JSON object; request lines carry their fields at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        out = {"ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name}
        if fields:
            out["msg"] = "request"
            out.update(fields)
        else:
            out["msg"] = record.getMessage()
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        formatter = JSONFormatter()
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def install_request_log(app, settings) -> None:
    """Outermost middleware first: the request log wraps the body limit, so a 413 has an id too."""
    from server.limits import BodyLimit

    limits = Limits.from_settings(settings)
    app.add_middleware(BodyLimit, max_bytes=limits.max_request_bytes)
    app.add_middleware(RequestLog, limits=limits, fault_inject=settings.fault_inject)
