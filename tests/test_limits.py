"""Bounded work: body size, prompt tokens, max_tokens, n, stop strings and the per-model waiting queue
are capped by settings; each refusal is a 4xx in the OpenAI shape, and the server keeps serving."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import TINY

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def limited(start_server, tiny_model_dir):
    return start_server(["--model", str(tiny_model_dir), "--served-model-name", TINY, "--dtype", "float32",
                         "--max-request-bytes", "4096", "--max-prompt-tokens", "64", "--max-tokens-limit", "100",
                         "--max-n", "3", "--max-num-seqs", "1", "--max-waiting", "1"],
                        env={"SLIMSERVE_MAX_STOP": "2", "SLIMSERVE_MAX_STOP_CHARS": "10",
                             "SLIMSERVE_RETRY_AFTER_S": "3"})


@pytest.fixture(scope="module")
def queued(start_server, tiny_model_dir):
    """One running slot, one waiting place; no max_tokens limit so a request can outlast the test's setup."""
    return start_server(["--model", str(tiny_model_dir), "--served-model-name", TINY, "--dtype", "float32",
                         "--max-num-seqs", "1", "--max-waiting", "1"], env={"SLIMSERVE_RETRY_AFTER_S": "3"})


@pytest.fixture()
def http(limited):
    with httpx.Client(base_url=limited.base_url, timeout=60) as c:
        yield c


def _error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    assert r.headers.get("x-request-id")
    return err


def test_oversized_body_is_413(http):
    big = {"model": TINY, "prompt": "x" * 5000, "max_tokens": 1}
    _error(http.post("/v1/completions", json=big), 413, code="request_too_large")

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"model": "tiny-llama", "prompt": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    r = http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    _error(r, 413, code="request_too_large")
    assert http.post("/v1/completions", json={"model": TINY, "prompt": "Hello", "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("extra, param", [
    ({"max_tokens": 101}, "max_tokens"),
    ({"max_completion_tokens": 101}, "max_completion_tokens"),
    ({"n": 4}, "n"),
    ({"stop": ["a", "b", "c"]}, "stop"),
    ({"stop": "x" * 11}, "stop"),
])
def test_field_limits_are_400(http, extra, param):
    err = _error(http.post("/v1/chat/completions", json={"model": TINY, "messages": MESSAGES, **extra}), 400, param)
    assert "at most" in err["message"]


def test_limits_at_the_bound_are_accepted(http):
    body = {"model": TINY, "messages": MESSAGES, "max_tokens": 2, "n": 3, "stop": ["a", "x" * 10]}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 3


def test_prompt_tokens_limit(http):
    err = _error(http.post("/v1/completions", json={"model": TINY, "prompt": list(range(5, 70)), "max_tokens": 1}),
                 400, "prompt", "prompt_too_long")
    assert "65 tokens" in err["message"]
    assert http.post("/v1/completions", json={"model": TINY, "prompt": list(range(5, 69)),
                                              "max_tokens": 1}).status_code == 200


def _waiting(base_url: str) -> float:
    for family in text_string_to_metric_families(httpx.get(base_url + "/metrics").text):
        for s in family.samples:
            if s.name == "slimserve_num_requests_waiting" and s.labels.get("model") == TINY:
                return s.value
    return 0.0


def test_full_queue_is_429_with_retry_after(queued):
    limited = queued
    http = httpx.Client(base_url=queued.base_url, timeout=60)
    """max_num_seqs 1 + max_waiting 1: one request runs, one waits, the next is refused (streamed or not)."""
    # long enough that the first request is still running when the second arrives, even on a fast machine
    long = {"model": TINY, "prompt": "Hello", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    stop = threading.Event()
    held: list[int] = []

    def hold():  # a streaming client that reads slowly until told to go away
        with httpx.Client(base_url=limited.base_url, timeout=60) as c:
            with c.stream("POST", "/v1/completions", json=long) as r:
                held.append(r.status_code)
                for _ in r.iter_lines():
                    if stop.is_set():
                        return
                    time.sleep(0.2)

    threads = [threading.Thread(target=hold) for _ in range(2)]
    try:
        for t in threads:
            t.start()
            time.sleep(0.5)
        deadline = time.monotonic() + 20
        while _waiting(limited.base_url) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _waiting(limited.base_url) == 1
        for stream in (False, True):
            r = http.post("/v1/completions", json={"model": TINY, "prompt": "Hi", "max_tokens": 1, "stream": stream})
            err = _error(r, 429, code="queue_full")
            assert err["type"] == "rate_limit_error" and r.headers["retry-after"] == "3"
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert held == [200, 200]
    deadline = time.monotonic() + 20  # the held streams were aborted: room again
    while time.monotonic() < deadline:
        r = http.post("/v1/completions", json={"model": TINY, "prompt": "Hi", "max_tokens": 1})
        if r.status_code == 200:
            break
        time.sleep(0.2)
    assert r.status_code == 200, r.text


def test_long_token_id_prompt_is_one_prompt():
    """Regression: a token-id prompt of more than 64 ids was refused as 'at most 64 choices'."""
    from server.protocol import CompletionRequest

    assert len(CompletionRequest(model=TINY, prompt=list(range(100))).prompts()) == 1
    with pytest.raises(ValueError, match="64 choices"):
        CompletionRequest(model=TINY, prompt=[[1]] * 33, n=2)
