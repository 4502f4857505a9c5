"""API keys: every /v1 route and /metrics need one when configured; /health and /ready stay open."""

from __future__ import annotations

import httpx
import openai
import pytest

from conftest import TINY, engine_flags


@pytest.fixture(scope="module")
def keyed_server(start_server, tiny_model_dir, engine):
    return start_server(["--model", str(tiny_model_dir), "--served-model-name", TINY, "--api-key", "k-one",
                         *engine_flags(engine)],
                        env={"SLIMSERVE_API_KEYS": "ignored-because-flag-wins"})


@pytest.mark.parametrize("method, path", [("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                                          ("POST", "/v1/completions"), ("GET", "/metrics")])
def test_routes_need_a_key(keyed_server, method, path):
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic k-one"}):
        r = httpx.request(method, keyed_server.base_url + path, headers=headers, json={})
        assert r.status_code == 401, (path, headers, r.text)
        assert r.json()["error"]["type"] == "authentication_error"


def test_health_and_ready_stay_open(keyed_server):
    assert httpx.get(keyed_server.base_url + "/health").status_code == 200
    assert httpx.get(keyed_server.base_url + "/ready").status_code == 200


def test_openai_client_with_the_key(keyed_server):
    good = openai.OpenAI(base_url=keyed_server.base_url + "/v1", api_key="k-one", max_retries=0)
    assert good.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert httpx.get(keyed_server.base_url + "/metrics", headers={"authorization": "Bearer k-one"}).status_code == 200
    bad = openai.OpenAI(base_url=keyed_server.base_url + "/v1", api_key="ignored-because-flag-wins", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_metrics_public_opens_only_metrics(start_server, tiny_model_dir):
    server = start_server(["--model", str(tiny_model_dir), "--served-model-name", TINY, "--api-key", "k-one",
                           "--metrics-public"])
    assert httpx.get(server.base_url + "/metrics").status_code == 200
    assert httpx.get(server.base_url + "/v1/models").status_code == 401
