"""A model folder's generation_config sampling values are the defaults of requests that leave them
out (as vLLM's `--generation-config auto`); `--generation-config none` turns that off."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest

from server.engines.generation_defaults import sampling_defaults
from server.protocol import ChatCompletionRequest


def test_reads_only_sampling_keys_in_range(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.2, "top_p": 0.9, "top_k": 0, "repetition_penalty": 9.0, "eos_token_id": 2,
         "min_p": "x"}))
    assert sampling_defaults(tmp_path) == {"temperature": 0.2, "top_p": 0.9, "top_k": -1}
    assert sampling_defaults(tmp_path / "missing") == {}


def test_request_fields_win_over_defaults():
    defaults = {"temperature": 0.2, "top_p": 0.9, "min_p": 0.1}
    omitted = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}])
    p = omitted.sampling(8, None, 0, defaults)
    assert (p.temperature, p.top_p, p.min_p, p.top_k) == (0.2, 0.9, 0.1, -1)
    given = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], temperature=1.0,
                                  top_p=1.0)
    p = given.sampling(8, None, 0, defaults)
    assert (p.temperature, p.top_p, p.min_p) == (1.0, 1.0, 0.1)


@pytest.fixture(scope="module")
def greedy_by_default_dir(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gencfg") / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, "temperature": 0.0}))
    return folder


def _texts(base_url: str, n: int, **extra) -> list[str]:
    body = {"model": "m", "prompt": "The quick brown", "max_tokens": 12, "ignore_eos": True, "n": n, "seed": 7,
            **extra}
    r = httpx.post(base_url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return [c["text"] for c in r.json()["choices"]]


def test_folder_defaults_apply_and_can_be_turned_off(start_server, greedy_by_default_dir):
    on = start_server(["--model", str(greedy_by_default_dir), "--served-model-name", "m", "--dtype", "float32"])
    greedy = _texts(on.base_url, 1, temperature=0)[0]
    assert _texts(on.base_url, 4) == [greedy] * 4  # temperature left out: the folder's 0 applies
    assert len(set(_texts(on.base_url, 4, temperature=1.5))) > 1  # the request's own value wins
    off = start_server(["--model", str(greedy_by_default_dir), "--served-model-name", "m", "--dtype", "float32",
                        "--generation-config", "none"])
    assert len(set(_texts(off.base_url, 4))) > 1  # temperature 1
