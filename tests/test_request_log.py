"""Structured request logs: one JSON line per request with its id, returned as x-request-id; keys and
prompts never reach the log."""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest

from conftest import TINY

KEY = "sk-test-secret-4242"
ADMIN_KEY = "admin-secret-9191"
PROMPT = "PROMPT-THAT-MUST-NOT-BE-LOGGED"


@pytest.fixture(scope="module")
def jserver(start_server, tiny_model_dir):
    return start_server(["--model", str(tiny_model_dir), "--served-model-name", TINY, "--dtype", "float32",
                         "--log-format", "json", "--api-key", KEY,
                         "--admin-key", ADMIN_KEY])


def _lines(server, request_id: str, timeout: float = 10) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = []
        for line in server.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{") and request_id in line:
                found.append(json.loads(line))
        if found:
            return found
        time.sleep(0.1)
    return []


def test_request_id_is_taken_logged_and_returned(jserver):
    r = httpx.post(jserver.base_url + "/v1/completions", headers={"authorization": f"Bearer {KEY}",
                                                                   "x-request-id": "req-abc.123"},
                   json={"model": TINY, "prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-abc.123"
    [entry] = _lines(jserver, "req-abc.123")
    assert entry["msg"] == "request" and entry["level"] == "info"
    assert {k: entry[k] for k in ("method", "path", "status", "model")} == {
        "method": "POST", "path": "/v1/completions", "status": 200, "model": TINY}
    assert entry["latency_ms"] > 0 and entry["ts"].endswith("Z")


def test_ids_are_made_when_missing_or_unsafe(jserver):
    for given in (None, "has space", "x" * 200, 'quote"inject'):
        headers = {"x-request-id": given} if given else {}
        r = httpx.get(jserver.base_url + "/health", headers=headers)
        rid = r.headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", rid), rid
        assert _lines(jserver, rid)[0]["path"] == "/health"


def test_errors_carry_the_id_too(jserver):
    for r in (httpx.get(jserver.base_url + "/v1/models"),  # no key: 401
              httpx.get(jserver.base_url + "/nope"),
              httpx.post(jserver.base_url + "/v1/completions", headers={"authorization": f"Bearer {KEY}"},
                         content=b"{not json", )):
        assert r.status_code in (400, 401, 404) and r.headers.get("x-request-id")
        assert _lines(jserver, r.headers["x-request-id"])[0]["status"] == r.status_code


def test_keys_and_prompts_are_never_logged(jserver):
    httpx.post(jserver.base_url + "/v1/chat/completions", headers={"authorization": f"Bearer {KEY}",
                                                                    "x-request-id": "chat-1"},
               json={"model": TINY, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2})
    httpx.get(jserver.base_url + "/v1/models", headers={"authorization": f"Bearer {KEY}-wrong", "x-request-id": "bad-1"})
    httpx.post(jserver.base_url + "/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/nope"},
               headers={"authorization": f"Bearer {ADMIN_KEY}", "x-request-id": "admin-1"})
    assert _lines(jserver, "chat-1") and _lines(jserver, "bad-1") and _lines(jserver, "admin-1")
    text = jserver.log_path.read_text(errors="replace")
    assert KEY not in text and ADMIN_KEY not in text and PROMPT not in text
    records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    loggers = {r["logger"] for r in records}  # Python logging, uvicorn's own included, is JSON in json mode
    assert {"slimserve.request", "uvicorn.error"} <= loggers, loggers
    assert not [line for line in text.splitlines() if re.match(r"^\d{4}-\d\d-\d\d .* (INFO|WARNING) ", line)]
