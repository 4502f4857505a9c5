"""Faults inside the engine fail only the requests they touched (a 500 in the OpenAI shape); the server
keeps serving, and /ready turns false only when the engine thread is dead.

Faults are injected by real code behind a switch: with SLIMSERVE_FAULT_INJECT=1 the server honours an
`x-slimserve-fault: POINT` header (see BatchScheduler._inject); without it the header does nothing.
"""

from __future__ import annotations

import concurrent.futures
import json

import httpx
import pytest

from conftest import TINY

LONG = {"model": TINY, "prompt": "Hello", "max_tokens": 30, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def faulty(start_server, tiny_model_dir):
    return start_server(["--model", str(tiny_model_dir), "--served-model-name", TINY, "--dtype", "float32"],
                        env={"SLIMSERVE_FAULT_INJECT": "1"})


def _post(base_url: str, body: dict, fault: str | None = None) -> httpx.Response:
    headers = {"x-slimserve-fault": fault} if fault else {}
    return httpx.post(base_url + "/v1/completions", json=body, headers=headers, timeout=60)


def _assert_500(r: httpx.Response, point: str) -> None:
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "internal_error" and f"injected fault: {point}" in err["message"]


@pytest.mark.parametrize("point", ["detokenize", "sample", "prefill"])
def test_a_request_fault_fails_only_that_request(faulty, point):
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        healthy = [pool.submit(_post, faulty.base_url, LONG) for _ in range(2)]
        bad = pool.submit(_post, faulty.base_url, {**LONG, "max_tokens": 5}, point)
        _assert_500(bad.result(), point)
        for f in healthy:
            r = f.result()
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["finish_reason"] == "length"
            assert r.json()["usage"]["completion_tokens"] == 30
    assert httpx.get(faulty.base_url + "/ready").status_code == 200


def test_a_failed_step_fails_its_batch_and_the_engine_goes_on(faulty):
    _assert_500(_post(faulty.base_url, LONG, "step"), "step")
    assert httpx.get(faulty.base_url + "/ready").status_code == 200
    first, second = _post(faulty.base_url, LONG), _post(faulty.base_url, LONG)
    assert first.status_code == second.status_code == 200
    assert first.json()["choices"][0]["text"] == second.json()["choices"][0]["text"]  # greedy: state is clean


def test_a_streamed_fault_ends_the_stream_with_an_openai_error(faulty):
    events = []
    with httpx.stream("POST", faulty.base_url + "/v1/completions", json={**LONG, "stream": True},
                      headers={"x-slimserve-fault": "detokenize"}, timeout=60) as r:
        assert r.status_code == 200  # headers were sent before generation began
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["type"] == "internal_error" and "injected fault" in err["message"]


def test_fault_header_is_ignored_unless_enabled(start_server, tiny_model_dir):
    plain = start_server(["--model", str(tiny_model_dir), "--served-model-name", TINY, "--dtype", "float32"])
    for point in ("detokenize", "kill"):
        r = _post(plain.base_url, {**LONG, "max_tokens": 3}, point)
        assert r.status_code == 200, r.text
    assert httpx.get(plain.base_url + "/ready").status_code == 200


def test_a_dead_engine_thread_turns_ready_false(start_server, tiny_model_dir):
    doomed = start_server(["--model", str(tiny_model_dir), "--served-model-name", TINY, "--dtype", "float32"],
                          env={"SLIMSERVE_FAULT_INJECT": "1"})
    body = {**LONG, "max_tokens": 2000, "stream": True}
    with httpx.stream("POST", doomed.base_url + "/v1/completions", json=body, timeout=60) as running:
        lines = running.iter_lines()
        next(line for line in lines if line.startswith("data: "))  # it is in the running batch now
        killer = _post(doomed.base_url, {**LONG, "max_tokens": 2}, "kill")
        assert killer.status_code == 500 and "engine stopped" in killer.json()["error"]["message"], killer.text
        rest = [line[6:] for line in lines if line.startswith("data: ")]  # nothing hangs on a dead thread
    assert rest[-1] == "[DONE]" and "engine stopped" in json.loads(rest[-2])["error"]["message"]
    ready = httpx.get(doomed.base_url + "/ready")
    assert ready.status_code == 503 and ready.json()["models"] == {TINY: False}
    assert httpx.get(doomed.base_url + "/health").status_code == 200
    after = _post(doomed.base_url, {**LONG, "max_tokens": 2})
    assert after.status_code == 503 and after.json()["error"]["code"] == "engine_dead"
