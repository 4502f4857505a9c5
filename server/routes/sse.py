"""Server-sent events in the shape OpenAI clients parse."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from server.errors import APIError, EngineError
from server.http_errors import body_of

log = logging.getLogger(__name__)


# Characters a line-splitting client (str.splitlines, httpx's aiter_lines) breaks a line at that JSON leaves
# raw inside strings (it escapes those below 0x20 itself): escaped, a token's text cannot cut a data line
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':')).translate(_LINE_BREAKS)}\n\n"


def sse_response(events: AsyncIterator[dict], headers: dict[str, str] | None = None) -> StreamingResponse:
    async def guarded() -> AsyncIterator[str]:
        try:
            async for item in events:
                yield event(item)
        except APIError as exc:
            yield event(body_of(exc))
        except Exception as exc:  # headers are gone: report the error in-band, then end the stream
            log.exception("stream failed")
            yield event(body_of(EngineError(f"generation failed: {type(exc).__name__}")))
        finally:
            await _close(events)
        yield "data: [DONE]\n\n"

    return StreamingResponse(guarded(), media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-accel-buffering": "no", **(headers or {})})


async def _close(events: AsyncIterator[dict]) -> None:
    """Closing the source early (client gone) cancels its generation, local or upstream."""
    close = getattr(events, "aclose", None)
    if close is not None:
        await close()
