"""Security regressions: keys compared in constant time over every key; trust_remote_code off unless
enabled, per model; adapters only from safetensors and admin routes only with the admin key are
covered in test_adapter_loader.py and test_adapters_api.py; keys never logged in test_request_log.py."""

from __future__ import annotations

import hmac

import pytest

from server import auth
from server.settings import load_settings


def test_keys_are_compared_in_constant_time_over_every_key(monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    keys = ["k-one", "k-two", "k-three"]
    assert auth.key_matches("k-one", keys)  # a match on the first key still checks the others
    assert len(calls) == 3 and all(isinstance(a, bytes) for a, _ in calls)
    calls.clear()
    assert not auth.key_matches("k-on", keys) and len(calls) == 3
    assert not auth.key_matches(None, keys)


def test_remote_code_is_off_unless_enabled(tiny_model_dir, monkeypatch):
    import transformers

    from server.engines.torch.engine import TorchEngine

    seen = []

    def config(path, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        raise OSError("stop here")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", config)
    assert load_settings().trust_remote_code is False
    for flag in (False, True):
        with pytest.raises(Exception):
            TorchEngine.load("tiny", tiny_model_dir, trust_remote_code=flag)
    assert seen == [False, True]


def test_remote_code_is_per_model(tiny_model_dir, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from server.engines import factory
    from server.engines.torch.engine import TorchEngine

    config = tmp_path / "serve.yaml"
    config.write_text(f"models:\n  - name: plain\n    model: {tiny_model_dir}\n"
                      f"  - name: custom\n    model: {tiny_model_dir}\n    trust_remote_code: true\n")
    seen = {}

    def fake_load(cls, model_id, path, **kwargs):
        seen[model_id] = kwargs["trust_remote_code"]
        return SimpleNamespace()  # a stand-in engine: the factory sets attributes on it

    monkeypatch.setattr(TorchEngine, "load", classmethod(fake_load))
    factory.build_engines(load_settings(config))
    assert seen == {"plain": False, "custom": True}
