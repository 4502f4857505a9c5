"""What both generation routes share: a dispatch.Call from the HTTP request, and the answer as JSON or SSE."""

from __future__ import annotations

import logging
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import JSONResponse

from server.dispatch import Answer, Call
from server.routes.sse import sse_response

log = logging.getLogger(__name__)
IGNORED_HEADER = "x-slimserve-ignored-fields"


def call_of(kind: str, body, request: Request) -> Call:
    return Call(kind, body, {k.lower(): v for k, v in request.headers.items()}, request.is_disconnected)


def reply(answer: Answer, body):
    """JSON or SSE; fields the request carried that changed nothing are named in a header (and logged)."""
    headers = dict(answer.headers)
    ignored = body.ignored_fields()
    if ignored:
        # Field names are client text: percent-encode them so any name fits a latin-1 header line.
        headers[IGNORED_HEADER] = ", ".join(quote(name, safe="") for name in ignored)
        log.debug("ignored request fields: %s", ", ".join(ignored))
    if answer.events is not None:
        return sse_response(answer.events, headers)
    return JSONResponse(answer.result, headers=headers or None)
