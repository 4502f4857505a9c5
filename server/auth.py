"""API-key checks as FastAPI dependencies. Keys are compared in constant time and never logged."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from server.errors import Forbidden, Unauthorized
from server.state import AppState


def get_state(request: Request) -> AppState:
    return request.app.state.slim


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def key_matches(given: str | None, keys: list[str]) -> bool:
    if given is None:
        return False
    found = False
    for key in keys:  # check every key so timing does not reveal which one matched
        found |= hmac.compare_digest(given.encode(), key.encode())
    return found


def require_client_key(request: Request, state: Annotated[AppState, Depends(get_state)]) -> None:
    keys = state.settings.api_keys
    if keys and not key_matches(_bearer(request), keys):
        raise Unauthorized("missing or invalid API key; send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")


def require_admin_key(request: Request, state: Annotated[AppState, Depends(get_state)]) -> None:
    admin = state.settings.admin_key
    if admin is None:
        raise Forbidden("runtime adapter changes are disabled; start the server with --admin-key")
    given = _bearer(request)
    if key_matches(given, [admin]):
        return
    if key_matches(given, state.settings.api_keys):
        raise Forbidden("this route needs the admin key; a client key is not enough")
    raise Unauthorized("missing or invalid admin key; send 'Authorization: Bearer <admin key>'",
                       code="invalid_api_key")


State = Annotated[AppState, Depends(get_state)]
ClientAuth = Depends(require_client_key)
AdminAuth = Depends(require_admin_key)
