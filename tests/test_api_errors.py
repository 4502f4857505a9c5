"""Every error is OpenAI-shaped with the right status, and the server keeps serving afterwards."""

from __future__ import annotations

import openai
import pytest

from conftest import TINY

MESSAGES = [{"role": "user", "content": "hi"}]


def _assert_error(response, status: int, *, param: str | None = None):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
    return body["error"]


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert "no-such-model" in str(err.value)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": TINY, "messages": MESSAGES, "max_tokens": -1}, "max_tokens"),
        ({"model": TINY, "messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
        ({"model": TINY, "messages": MESSAGES, "temperature": 2.5}, "temperature"),
        ({"model": TINY, "messages": MESSAGES, "temperature": -0.1}, "temperature"),
        ({"model": TINY, "messages": MESSAGES, "top_p": 0}, "top_p"),
        ({"model": TINY, "messages": MESSAGES, "n": 0}, "n"),
        ({"model": TINY}, "messages"),
        ({"model": TINY, "messages": []}, "messages"),
        ({"messages": MESSAGES}, "model"),
        ({"model": TINY, "messages": [{"role": "wizard", "content": "x"}]}, None),
        ({"model": TINY, "messages": MESSAGES, "stop": [""]}, None),
        ({"model": TINY, "messages": MESSAGES, "top_logprobs": 3}, None),
        ({"model": TINY, "messages": MESSAGES, "stream_options": {"include_usage": True}}, None),
    ],
)
def test_invalid_chat_parameters_are_400(http, body, param):
    _assert_error(http.post("/v1/chat/completions", json=body), 400, param=param)


def test_malformed_json_is_400(http):
    for path in ("/v1/chat/completions", "/v1/completions"):
        r = http.post(path, content=b'{"model": "x", "messages": [', headers={"content-type": "application/json"})
        err = _assert_error(r, 400)
        assert "JSON" in err["message"]


def test_invalid_completion_parameters_are_400(http):
    _assert_error(http.post("/v1/completions", json={"model": TINY}), 400, param="prompt")
    _assert_error(http.post("/v1/completions", json={"model": TINY, "prompt": "x", "logprobs": 9}), 400)
    _assert_error(http.post("/v1/completions", json={"model": TINY, "prompt": []}), 400)
    _assert_error(http.post("/v1/completions", json={"model": TINY, "prompt": [-5, 3]}), 400)


def test_context_length_exceeded_is_400(http):
    long_prompt = "Hello world " * 1500  # far beyond the tiny model's 2048 positions
    err = _assert_error(http.post("/v1/completions", json={"model": TINY, "prompt": long_prompt}), 400)
    assert err["code"] == "context_length_exceeded"
    err = _assert_error(http.post("/v1/completions", json={"model": TINY, "prompt": "Hi", "max_tokens": 2100}), 400)
    assert "maximum context length is 2048" in err["message"]


def test_unknown_route_and_method(http):
    _assert_error(http.get("/v1/nothing-here"), 404)
    _assert_error(http.get("/v1/chat/completions"), 405)


def test_server_still_serves_after_errors(http, client):
    http.post("/v1/chat/completions", content=b"not json", headers={"content-type": "application/json"})
    r = client.chat.completions.create(model=TINY, messages=MESSAGES, max_tokens=3)
    assert r.choices[0].message.role == "assistant"
