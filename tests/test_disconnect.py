"""A client that goes away stops its generation; the engine's abort counter proves it."""

from __future__ import annotations

import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from conftest import TINY


def _metric(base_url: str, name: str) -> float:
    for family in text_string_to_metric_families(httpx.get(base_url + "/metrics").text):
        for s in family.samples:
            if s.name == name and s.labels.get("model") == TINY:
                return s.value
    return 0.0


def _wait_for(predicate, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def _engine_aborts(server) -> float:
    return _metric(server.base_url, "slimserve_engine_aborted_sequences_total")


def test_stream_disconnect_aborts_generation(server):
    before = _engine_aborts(server)
    body = {"model": TINY, "prompt": "Hello", "max_tokens": 2000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=30) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                break  # leave mid-stream
    assert _wait_for(lambda: _engine_aborts(server) == before + 1)
    assert _wait_for(lambda: _metric(server.base_url, "slimserve_num_requests_running") == 0)


def test_non_streamed_disconnect_aborts_generation(server):
    before = _engine_aborts(server)
    body = {"model": TINY, "prompt": "Hello", "max_tokens": 2000, "ignore_eos": True}
    try:
        httpx.post(server.base_url + "/v1/completions", json=body, timeout=0.5)
    except httpx.TimeoutException:
        pass
    assert _wait_for(lambda: _engine_aborts(server) == before + 1)
