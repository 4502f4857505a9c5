"""Typed errors of the request path, with no HTTP in them: a message, the offending field (`param`) and a
short machine-readable `code`. The HTTP layer (server/http_errors.py) maps each class to its status.

Errors of one component live beside it: AdapterError in adapters/loader.py, the upstream errors in
engines/remote.py. ConfigError is raised at start-up, before any request.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad setting, found at start-up; the message names the setting."""

    def __init__(self, setting: str, message: str):
        super().__init__(f"invalid setting '{setting}': {message}")
        self.setting = setting


class APIError(Exception):
    """An error a client sees, in the OpenAI shape."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class BadRequest(APIError):
    """The request itself is wrong (a field, the prompt, the context length)."""


class Unauthorized(APIError):
    """No key, or a wrong one."""


class Forbidden(APIError):
    """A valid key that may not do this."""


class NotFound(APIError):
    """A model, adapter or policy the server does not have."""


class Overloaded(APIError):
    """The server cannot take it now (starting, draining, engine dead, upstream down): retry elsewhere."""


class EngineError(APIError):
    """Generation failed inside an engine; other requests go on."""


class TooLarge(APIError):
    """The request body is above the server's limit."""


class QueueFull(APIError):
    """The model's waiting queue is at its bound: come back after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message, code="queue_full")
        self.retry_after = retry_after
