"""The one table from typed errors to HTTP: status, OpenAI error type and body, extra headers; and the
FastAPI handlers that apply it. Nothing below the routes knows a status code."""

from __future__ import annotations

import json
import logging

from adapters.loader import AdapterError
from server.engines.remote import UpstreamError, UpstreamTimeout
from server.errors import (APIError, BadRequest, EngineError, Forbidden, NotFound, Overloaded, QueueFull, TooLarge,
                           Unauthorized)

log = logging.getLogger(__name__)

# most specific first: QueueFull before a plain APIError, UpstreamTimeout before Overloaded
_TABLE: list[tuple[type[BaseException], int, str]] = [
    (QueueFull, 429, "rate_limit_error"),
    (TooLarge, 413, "invalid_request_error"),
    (BadRequest, 400, "invalid_request_error"),
    (Unauthorized, 401, "authentication_error"),
    (Forbidden, 403, "permission_error"),
    (NotFound, 404, "not_found_error"),
    (UpstreamTimeout, 504, "timeout_error"),
    (Overloaded, 503, "service_unavailable"),
    (EngineError, 500, "internal_error"),
]
_ADAPTER_TYPES = {403: "permission_error", 404: "not_found_error", 503: "service_unavailable"}


def status_of(exc: BaseException) -> int:
    if isinstance(exc, UpstreamError):
        return exc.status  # the upstream's own answer passes through
    if isinstance(exc, AdapterError):
        return exc.status
    for cls, status, _ in _TABLE:
        if isinstance(exc, cls):
            return status
    return 500


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def body_of(exc: BaseException) -> dict:
    """The OpenAI error body for any exception (unexpected ones say only their type)."""
    if isinstance(exc, UpstreamError):
        return error_body(exc.message, exc.error_type, exc.param, exc.code)
    if isinstance(exc, AdapterError):
        return error_body(str(exc), _ADAPTER_TYPES.get(exc.status, "invalid_request_error"),
                          "lora_path" if exc.status != 404 else None, exc.reason)
    if isinstance(exc, APIError):
        error_type = next((t for cls, _, t in _TABLE if isinstance(exc, cls)), "internal_error")
        return error_body(exc.message, error_type, exc.param, exc.code)
    return error_body(f"internal error: {type(exc).__name__}", "internal_error")


def headers_of(exc: BaseException) -> dict[str, str] | None:
    return {"retry-after": str(exc.retry_after)} if isinstance(exc, QueueFull) else None


def _validation_message(exc) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".rstrip(": "), None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    cause = first.get("ctx", {}).get("error")
    if getattr(cause, "field", None):  # protocol.StrictFieldError: the unknown field is the param
        param = cause.field
    msg = first.get("msg", "invalid request").removeprefix("Value error, ")
    if first.get("type") == "missing":
        msg = "field required"
    elif first.get("type") == "extra_forbidden":
        msg = "unknown field"
    return (f"{param}: {msg}" if param else msg), param


def install_error_handlers(app) -> None:
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    def answer(exc: BaseException) -> JSONResponse:
        return JSONResponse(body_of(exc), status_code=status_of(exc), headers=headers_of(exc))

    @app.exception_handler(AdapterError)
    async def _adapter(_: Request, exc: AdapterError) -> JSONResponse:
        return answer(exc)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return answer(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(json.JSONDecodeError)
    async def _json(_: Request, exc: json.JSONDecodeError) -> JSONResponse:
        return JSONResponse(error_body(f"request body is not valid JSON: {exc}", "invalid_request_error"), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "internal_error"), 500)
