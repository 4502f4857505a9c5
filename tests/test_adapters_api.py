"""Adapters over HTTP: selection by `model`, hot load/unload, just in time, eviction, replacement, refusals."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapter_factory import make_adapter
from conftest import TINY, engine_flags

ADMIN = {"authorization": "Bearer admin-secret"}
CLIENT = {"authorization": "Bearer client-key"}


@pytest.fixture(scope="module")
def lora_setup(tiny_model_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("adapters")
    root = base / "root"
    root.mkdir()
    outside = base / "outside"
    outside.mkdir()
    folders = {}
    for i, name in enumerate(["pinned", "a", "b", "c", "d", "jit1", "big"]):
        folders[name] = make_adapter(tiny_model_dir, root / name, seed=10 + i, rank=32 if name == "big" else 4)
    folders["stranger"] = make_adapter(tiny_model_dir, outside / "stranger", seed=99)
    nan = make_adapter(tiny_model_dir, root / "nan", seed=5)
    from safetensors.torch import load_file, save_file
    tensors = load_file(nan / "adapter_model.safetensors")
    next(iter(tensors.values()))[0, 0] = float("nan")
    save_file(tensors, nan / "adapter_model.safetensors")
    pickled = shutil.copytree(folders["a"], root / "pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    return root, folders


@pytest.fixture(scope="module")
def lserver(start_server, tiny_model_dir, lora_setup, engine):
    root, folders = lora_setup
    return start_server([
        "--model", str(tiny_model_dir), "--served-model-name", TINY, "--dtype", "float32",
        "--adapter-root", str(root), "--admin-key", "admin-secret", "--api-key", "client-key",
        "--max-loras", "3", "--max-lora-rank", "16", "--lora", f"pinned={folders['pinned']}", *engine_flags(engine),
    ])


@pytest.fixture()
def http(lserver):
    with httpx.Client(base_url=lserver.base_url, timeout=120, headers=CLIENT) as c:
        yield c


@pytest.fixture(scope="module")
def oai(lserver):
    return openai.OpenAI(base_url=lserver.base_url + "/v1", api_key="client-key", max_retries=0, timeout=120)


def _complete(oai, model, prompt="Hello, world!", n=10) -> str:
    return oai.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0,
                                  extra_body={"ignore_eos": True}).choices[0].text


def _load(http, name, path, **extra):
    return http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path), **extra},
                     headers=ADMIN)


def _unload(http, name):
    return http.post("/v1/unload_lora_adapter", json={"lora_name": name}, headers=ADMIN)


def _resident(http) -> list[str]:
    return [m["id"] for m in http.get("/v1/models").json()["data"] if m["parent"] == TINY]


def _metric(http, name, **labels) -> float:
    total = 0.0
    for fam in text_string_to_metric_families(http.get("/metrics").text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def _clear(http):
    for name in _resident(http):
        if name != "pinned":
            _unload(http, name)


def test_startup_adapter_is_listed_and_changes_output(http, oai, lora_setup):
    cards = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert cards["pinned"]["parent"] == TINY
    assert cards["pinned"]["root"] == str(lora_setup[1]["pinned"])
    assert cards[TINY]["parent"] is None
    assert _complete(oai, "pinned") != _complete(oai, TINY)
    assert oai.completions.create(model="pinned", prompt="hi", max_tokens=2).model == "pinned"


def test_admin_routes_need_the_admin_key(lserver, lora_setup):
    body = {"lora_name": "a", "lora_path": str(lora_setup[1]["a"])}
    url = lserver.base_url + "/v1/load_lora_adapter"
    assert httpx.post(url, json=body).status_code == 401
    r = httpx.post(url, json=body, headers=CLIENT)
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    assert httpx.post(url, json=body, headers={"authorization": "Bearer nope"}).status_code == 401


def test_admin_routes_disabled_without_admin_key(server):
    r = httpx.post(server.base_url + "/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/tmp"})
    assert r.status_code == 403 and "--admin-key" in r.json()["error"]["message"]


def test_hot_load_use_unload(http, oai, lora_setup):
    _clear(http)
    r = _load(http, "alias", lora_setup[1]["a"])  # a name with no folder of its own under the root
    assert r.status_code == 200, r.text
    assert "alias" in _resident(http)
    with_a = _complete(oai, "alias")
    assert with_a != _complete(oai, TINY)
    assert _load(http, "alias", lora_setup[1]["b"]).status_code == 400  # exists, no load_inplace
    assert _unload(http, "alias").status_code == 200
    assert "alias" not in _resident(http)
    with pytest.raises(openai.NotFoundError):
        _complete(oai, "alias")
    assert _unload(http, "alias").status_code == 404
    # a folder under the root comes back just in time after an unload
    assert _complete(oai, "a") == with_a
    assert {m["id"]: m["source"] for m in http.get("/v1/models").json()["data"] if m["parent"]}["a"] == "jit"


def test_just_in_time_loads_once_for_concurrent_first_requests(lserver, http):
    _clear(http)
    before = _metric(http, "slimserve_adapter_loads_total")
    client = openai.AsyncOpenAI(base_url=lserver.base_url + "/v1", api_key="client-key", max_retries=0)

    async def burst():
        calls = [client.completions.create(model="jit1", prompt="Hello", max_tokens=4, temperature=0) for _ in range(8)]
        return await asyncio.gather(*calls)

    texts = {r.choices[0].text for r in asyncio.run(burst())}
    assert len(texts) == 1
    assert _metric(http, "slimserve_adapter_loads_total") == before + 1
    assert "jit1" in _resident(http)


def test_lru_eviction_spares_pinned(http, oai, lora_setup):
    _clear(http)
    for name in ("a", "b"):
        assert _load(http, name, lora_setup[1][name]).status_code == 200
    _complete(oai, "a", n=2)  # a is now more recent than b
    assert _load(http, "c", lora_setup[1]["c"]).status_code == 200
    assert sorted(_resident(http)) == ["a", "c", "pinned"]
    assert _metric(http, "slimserve_adapter_unloads_total", reason="evict") >= 1


def test_busy_adapter_is_not_evicted_and_replacement_keeps_running_request(lserver, http, oai, lora_setup):
    _clear(http)
    folders = lora_setup[1]
    assert _load(http, "a", folders["a"]).status_code == 200
    assert _load(http, "b", folders["b"]).status_code == 200
    result = {}

    def long_stream():
        stream = oai.completions.create(model="a", prompt="Hello", max_tokens=1900, temperature=0, stream=True,
                                        extra_body={"ignore_eos": True}, stream_options={"include_usage": True})
        finish, usage = None, None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            usage = chunk.usage or usage
        result.update(finish=finish, tokens=usage.completion_tokens)

    t = threading.Thread(target=long_stream)
    t.start()
    try:
        deadline = time.monotonic() + 10
        while _metric(http, "slimserve_num_requests_running") < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        _complete(oai, "b", n=1)  # now "a" is the least recent, but busy: loading "c" must evict "b"
        assert _load(http, "c", folders["c"]).status_code == 200
        assert sorted(_resident(http)) == ["a", "c", "pinned"]
        # replace "a" in place while its request is still running
        assert _load(http, "a", folders["d"], load_inplace=True).status_code == 200
        assert _complete(oai, "a") == _direct(http, oai, folders["d"])
    finally:
        t.join(timeout=120)
    assert result == {"finish": "length", "tokens": 1900}


def _direct(http, oai, folder) -> str:
    assert _load(http, "d-direct", folder, load_inplace=True).status_code == 200
    out = _complete(oai, "d-direct")
    _unload(http, "d-direct")
    return out


def test_no_room_when_everything_is_pinned_or_busy(http, lora_setup):
    _clear(http)
    folders = lora_setup[1]
    assert _load(http, "a", folders["a"], pinned=True).status_code == 200
    assert _load(http, "b", folders["b"], pinned=True).status_code == 200
    r = _load(http, "c", folders["c"])
    assert r.status_code == 503 and "pinned or busy" in r.json()["error"]["message"]
    assert sorted(_resident(http)) == ["a", "b", "pinned"]
    _unload(http, "a")
    _unload(http, "b")


@pytest.mark.parametrize("name, path_key, status, needle", [
    ("../evil", "a", 400, "invalid adapter name"),
    (".hidden", "a", 400, "invalid adapter name"),
    ("x" * 65, "a", 400, "invalid adapter name"),
    ("stranger", "stranger", 403, "outside the configured adapter roots"),
    ("pickled", "pickled", 400, "pickle"),
    ("big", "big", 400, "max_lora_rank"),
    ("ghost", "ghost", 404, "does not exist"),
    ("nan", "nan", 400, "NaN"),
])
def test_hostile_loads_are_refused_and_server_keeps_serving(http, oai, lora_setup, name, path_key, status, needle):
    root, folders = lora_setup
    path = folders.get(path_key, root / path_key)
    before = _resident(http)
    r = _load(http, name, path)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and set(err) == {"message", "type", "param", "code"}
    assert _resident(http) == before
    assert _complete(oai, "pinned", n=2)


def test_traversal_in_model_field_is_not_found(oai):
    for model in ("../root/a", "..", "/etc/passwd", "pickled"):
        with pytest.raises((openai.NotFoundError, openai.BadRequestError)):
            _complete(oai, model, n=1)


def test_malformed_admin_body_is_400(http):
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "a"}, headers=ADMIN)
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"
