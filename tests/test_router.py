"""The router end to end: a real slimserve serving a teacher, a student, a remote upstream (a second
slimserve on its own free port) and a remote whose port is closed, driven with the OpenAI client."""

from __future__ import annotations

import httpx
import openai
import pytest
import yaml

from compress.cost import Cost, write_cost
from tests.conftest import TINY, ServerProcess, free_port
from tests.tiny_model import build_tiny_model

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


TEACHER_COST, STUDENT_COST = 0.01, 0.004  # s/token: the teacher's from serve.yaml, the student's from its manifest


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    # same tokenizer as the teacher (built from the same text), different weights, half the blocks
    folder = build_tiny_model(tmp_path_factory.mktemp("student") / "model", seed=1, layers=1)
    write_cost(folder, Cost(seconds_per_token=STUDENT_COST, weight_bytes=1000))
    return folder


@pytest.fixture(scope="module")
def upstream(start_server, tiny_model_dir):
    return start_server(["--model", str(tiny_model_dir), "--served-model-name", TINY, "--dtype", "float32",
                         "--api-key", "upstream-key"])


@pytest.fixture(scope="module")
def router_server(tmp_path_factory, tiny_model_dir, student_dir, upstream):
    config = {
        "dtype": "float32",
        "models": [
            {"name": "teacher", "model": str(tiny_model_dir), "cost": {"seconds_per_token": TEACHER_COST}},
            {"name": "student", "model": str(student_dir)},
            {"name": "far", "engine": "remote", "base_url": f"{upstream.base_url}/v1", "upstream_model": TINY,
             "api_key_env": "FAR_KEY", "timeout": 60},
            {"name": "dead", "engine": "remote", "base_url": f"http://127.0.0.1:{free_port()}/v1", "timeout": 5},
        ],
        "router": {
            "default": "small",
            "policies": {
                "small": {"type": "fixed", "target": "student"},
                "rules": {"type": "rules", "default": "student", "rules": [
                    {"regex": "(?i)capital", "target": "teacher"},
                    {"max_tokens_over": 20, "target": "teacher"},
                    {"header": "x-tier", "header_value": "premium", "target": "far"},
                    {"prompt_tokens_over": 200, "target": "teacher"},
                ]},
                "never_escalate": {"type": "cascade", "student": "student", "teacher": "teacher",
                                   "threshold": -1000.0, "first_tokens": 4},
                "always_escalate": {"type": "cascade", "student": "student", "teacher": "teacher",
                                    "threshold": -1e-9, "metric": "min_logprob", "first_tokens": 4},
                "mid": {"type": "cascade", "student": "student", "teacher": "teacher", "threshold": -3.0},
                "deadfirst": {"type": "fixed", "target": "dead", "fallback": ["far", "student"]},
                "deadstudent": {"type": "cascade", "student": "dead", "teacher": "teacher", "threshold": -1.0},
            },
        },
    }
    folder = tmp_path_factory.mktemp("router")
    (folder / "serve.yaml").write_text(yaml.safe_dump(config))
    server = ServerProcess(["--config", str(folder / "serve.yaml")], env={"FAR_KEY": "upstream-key"},
                           log_path=folder / "server.log")
    server.wait_ready(180)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(router_server):
    return openai.OpenAI(base_url=f"{router_server.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def chat(client, model, **kw):
    kw.setdefault("max_tokens", 8)
    raw = client.chat.completions.with_raw_response.create(model=model, messages=kw.pop("messages", PROMPT),
                                                           temperature=0, **kw)
    return raw.parse(), raw.headers.get("x-slimserve-route", "")


def route(header: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in header.split("; "))


def test_models_lists_every_target_and_auto(client):
    cards = client.models.list().data
    ids = {m.id for m in cards}
    assert {"teacher", "student", "far", "dead", "auto", "auto:rules", "auto:mid"} <= ids
    # the router's own cards are slimserve's, whatever engine the last listed model has (was: "remote")
    assert {m.owned_by for m in cards if m.id.startswith("auto")} == {"slimserve"}
    assert {m.id: m.owned_by for m in cards}["far"] == "remote"


def test_router_fallback_unhealthy_seconds_reaches_remote_engines(tmp_path):
    from server.engines.factory import build_engines
    from server.settings import load_settings

    config = {"models": [{"name": "up", "engine": "remote", "base_url": "http://127.0.0.1:9/v1"}],
              "router": {"default": "f", "policies": {"f": {"type": "fixed", "target": "up"}},
                         "fallback": {"unhealthy_seconds": 3.5}}}
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    engines = build_engines(load_settings(tmp_path / "serve.yaml"))
    assert engines["up"].unhealthy_seconds == 3.5


def test_fixed_policy_and_default(client):
    resp, header = chat(client, "auto")
    assert resp.model == "student"
    # cost saved against the costliest priced model (the teacher): 1 - 0.004 / 0.01 per token
    assert route(header) == {"policy": "small", "target": "student", "reason": "fixed", "cost_saved": "0.600"}


def test_rules_policy(client):
    assert chat(client, "auto:rules")[0].model == "teacher"  # regex on the last user message
    hello = [{"role": "user", "content": "Hello there"}]
    assert chat(client, "auto:rules", messages=hello)[0].model == "student"  # no rule: default
    resp, header = chat(client, "auto:rules", messages=hello, max_tokens=30)
    assert resp.model == "teacher" and route(header)["reason"] == "rule 1"
    resp, header = chat(client, "auto:rules", messages=hello, extra_headers={"x-tier": "premium"})
    assert resp.model == "far" and route(header)["reason"] == "rule 2"
    long = [{"role": "user", "content": "Hello there " * 150}]
    assert chat(client, "auto:rules", messages=long)[0].model == "teacher"


def test_named_models_answer_directly(client):
    teacher = chat(client, "teacher")[0]
    assert teacher.model == "teacher" and teacher.choices[0].message.content
    # the remote answers exactly what its upstream (the same weights) answers locally
    far = chat(client, "far")[0]
    assert far.model == "far"
    assert far.choices[0].message.content == teacher.choices[0].message.content


def test_cascade_escalates_below_threshold_only(client):
    resp, header = chat(client, "auto:never_escalate")
    assert resp.model == "student" and route(header)["reason"].startswith("confident")
    assert route(header)["cost_saved"] == "0.600"
    assert resp.choices[0].logprobs is None  # asked for internally, not by the client
    resp, header = chat(client, "auto:always_escalate")
    assert resp.model == "teacher" and route(header)["reason"].startswith("escalated")
    # both answered: the student's tokens were spent for nothing (8 each: the tiny models rarely stop early)
    student = client.chat.completions.create(model="student", messages=PROMPT, temperature=0, max_tokens=8)
    wasted = student.usage.completion_tokens * STUDENT_COST / (resp.usage.completion_tokens * TEACHER_COST)
    assert float(route(header)["cost_saved"]) == pytest.approx(-wasted, abs=1e-3)
    # the decision is the student's own confidence against the threshold
    direct = client.chat.completions.create(model="student", messages=PROMPT, temperature=0, max_tokens=8,
                                            logprobs=True)
    mean = sum(t.logprob for t in direct.choices[0].logprobs.content) / len(direct.choices[0].logprobs.content)
    resp, header = chat(client, "auto:mid")
    assert resp.model == ("student" if mean >= -3.0 else "teacher")
    assert f"{mean:.3f}" in route(header)["reason"]


def test_cascade_streaming_decides_before_sending(client):
    for policy, expected in (("never_escalate", "student"), ("always_escalate", "teacher")):
        with client.chat.completions.with_streaming_response.create(
                model=f"auto:{policy}", messages=PROMPT, temperature=0, max_tokens=12, stream=True) as raw:
            assert route(raw.headers["x-slimserve-route"])["target"] == expected
            chunks = list(raw.parse())
        assert {c.model for c in chunks} == {expected}
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        alone = client.chat.completions.create(model=expected, messages=PROMPT, temperature=0, max_tokens=12)
        assert text == alone.choices[0].message.content  # nothing of the student leaks into a teacher answer
        assert all(c.choices[0].logprobs is None for c in chunks if c.choices)


def test_fallback_when_remote_port_is_closed(client):
    resp, header = chat(client, "auto:deadfirst")
    assert resp.model == "far"
    parts = route(header)
    assert parts["target"] == "far" and "fallback from dead" in parts["reason"]
    resp, header = chat(client, "auto:deadstudent")  # the cascade's student is down: the teacher answers
    assert resp.model == "teacher" and "fallback from dead" in route(header)["reason"]


def test_remote_errors_and_streams_pass_through(client, router_server):
    with pytest.raises(openai.BadRequestError) as err:  # the upstream's own 400, in OpenAI shape
        client.chat.completions.create(model="far", messages=PROMPT, max_tokens=4000)
    assert err.value.body["code"] == "context_length_exceeded"
    chunks = list(client.chat.completions.create(model="far", messages=PROMPT, temperature=0, max_tokens=6,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 6 and {c.model for c in chunks} == {"far"}
    with pytest.raises(openai.APIStatusError) as err:  # a named remote that is down: 503, not a hang
        client.chat.completions.create(model="dead", messages=PROMPT, max_tokens=4)
    assert err.value.status_code == 503 and err.value.body["code"] == "upstream_unavailable"
    ready = httpx.get(f"{router_server.base_url}/ready").json()
    assert ready["ready"] and ready["models"]["dead"] is False  # a down upstream does not unready the router


def test_unknown_policy_is_404(client):
    with pytest.raises(openai.NotFoundError):
        chat(client, "auto:nope")


def test_route_metrics(client, router_server):
    # every series below comes from requests made here, so the test also passes when run alone
    chat(client, "auto:always_escalate")
    chat(client, "auto:deadfirst")  # dead refused: far answers
    with pytest.raises(openai.APIStatusError):
        chat(client, "dead")  # a named remote that is down: 503
    text = httpx.get(f"{router_server.base_url}/metrics").text
    assert 'slimserve_route_decisions_total{policy="always_escalate",reason="escalated",target="teacher"}' in text
    assert 'slimserve_route_escalations_total{policy="always_escalate"}' in text
    assert "slimserve_cascade_confidence_bucket" in text
    assert 'slimserve_route_fallbacks_total{policy="deadfirst",skipped="dead",to="far"' in text
    assert 'slimserve_requests_total{adapter="",model="far",status="200"}' in text  # remote requests counted
    assert 'slimserve_requests_total{adapter="",model="dead",status="503"}' in text


def metric(text: str, series: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(series))


def test_route_cost_metrics_and_streams(client, router_server):
    url = f"{router_server.base_url}/metrics"
    before = httpx.get(url).text
    resp, _ = chat(client, "auto")  # fixed: the student
    tokens = resp.usage.completion_tokens
    with client.chat.completions.with_streaming_response.create(
            model="auto:never_escalate", messages=PROMPT, temperature=0, max_tokens=6, stream=True) as raw:
        assert route(raw.headers["x-slimserve-route"])["cost_saved"] == "0.600"  # per token, before the length
        chunks = list(raw.parse())
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)  # the book's usage is not sent
    with client.chat.completions.with_streaming_response.create(
            model="auto:never_escalate", messages=PROMPT, temperature=0, max_tokens=6, stream=True,
            stream_options={"include_usage": True}) as raw:
        asked = list(raw.parse())
    assert asked[-1].usage.completion_tokens == 6  # asked for: kept
    with client.chat.completions.with_streaming_response.create(  # rules -> far: no cost known, no cost_saved
            model="auto:rules", messages=[{"role": "user", "content": "Hello"}], temperature=0, max_tokens=4,
            stream=True, extra_headers={"x-tier": "premium"}) as raw:
        assert "cost_saved" not in route(raw.headers["x-slimserve-route"])
        unpriced = list(raw.parse())
    assert {c.model for c in unpriced} == {"far"} and all(c.choices and c.usage is None for c in unpriced)
    after = httpx.get(url).text
    grew = {s: metric(after, s) - metric(before, s) for s in (
        'slimserve_route_reference_cost_seconds_total{policy="small"}',
        'slimserve_route_spent_cost_seconds_total{policy="small",target="student"}',
        'slimserve_route_cost_saved_seconds{policy="small"}',
        'slimserve_route_reference_cost_seconds_total{policy="never_escalate"}',
        'slimserve_route_spent_cost_seconds_total{policy="never_escalate",target="student"}')}
    assert list(grew.values())[:3] == pytest.approx([tokens * TEACHER_COST, tokens * STUDENT_COST,
                                                      tokens * (TEACHER_COST - STUDENT_COST)])
    assert list(grew.values())[3:] == pytest.approx([12 * TEACHER_COST, 12 * STUDENT_COST])  # both streams, at end


def test_costs_come_from_config_over_manifest(tmp_path):
    from types import SimpleNamespace

    from server.routing.cost import model_costs
    from server.settings import load_settings

    for name, cost in (("a", 0.5), ("b", 0.25), ("c", 0.125)):
        (tmp_path / name).mkdir()
        write_cost(tmp_path / name, Cost(seconds_per_token=cost))
    config = {"models": [{"name": "a", "model": str(tmp_path / "a"), "cost": {"seconds_per_token": 0.75}},
                         {"name": "b", "model": str(tmp_path / "b")},
                         {"name": "c", "model": str(tmp_path / "c"), "quantization": "int8"},
                         {"name": "d", "model": str(tmp_path / "d")}]}
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    local = SimpleNamespace(local=True)
    engines = {"a": SimpleNamespace(source=str(tmp_path / "a"), capabilities=local),
               "b": SimpleNamespace(source=str(tmp_path / "b"), capabilities=local),
               "c": SimpleNamespace(source=str(tmp_path / "c"), capabilities=local),
               "d": SimpleNamespace(source=str(tmp_path / "d"), capabilities=local)}
    costs = model_costs(load_settings(tmp_path / "serve.yaml"), engines)
    # a: the config wins; b: its manifest; c: quantized in-process, so its folder's cost is not its own; d: none
    assert {k: v.seconds_per_token for k, v in costs.items()} == {"a": 0.75, "b": 0.25}


def test_compress_cost_measures_and_writes_the_manifest(tmp_path, capsys):
    import argparse

    from compress.cost import read_cost
    from server import cli_cost
    from server.routing.cost import ModelCost

    folder = build_tiny_model(tmp_path / "model", seed=2, layers=1)

    def cost(**kw) -> str:
        args = dict(model=str(folder), quantization=None, dtype="auto", device="cpu", steps=4, repeats=1, write=True,
                    cache_dir=tmp_path)
        assert cli_cost.run(argparse.Namespace(**{**args, **kw})) == 0
        return capsys.readouterr().out

    cost()
    measured = ModelCost.model_validate(read_cost(folder))  # what the router reads
    assert measured.seconds_per_token > 0 and measured.weight_bytes > 0 and measured.kv_bytes_per_token > 0
    assert measured.device == "cpu" and measured.threads >= 1 and "compress cost" in measured.measured
    out = cost(quantization="int8")
    snippet = yaml.safe_load(out[out.index("cost:"):])["cost"]  # printed for serve.yaml, not written
    assert ModelCost.model_validate(snippet).weight_bytes < measured.weight_bytes
    assert ModelCost.model_validate(read_cost(folder)) == measured
