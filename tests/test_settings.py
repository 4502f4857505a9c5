"""Settings come from flags, then SLIMSERVE_* env, then serve.yaml; bad values name the setting."""

from __future__ import annotations

import subprocess
import sys

import pytest

from server.errors import ConfigError
from server.settings import load_settings


def test_priority_flag_over_env_over_yaml(tmp_path, monkeypatch):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("port: 9001\nmax-model-len: 256\nhost: 0.0.0.0\napi_keys: [a, b]\n")
    monkeypatch.setenv("SLIMSERVE_PORT", "9002")
    monkeypatch.setenv("SLIMSERVE_MAX_NUM_SEQS", "7")
    s = load_settings(cfg, port=None, host="127.0.0.2")
    assert (s.port, s.host, s.max_model_len, s.max_num_seqs, s.api_keys) == (9002, "127.0.0.2", 256, 7, ["a", "b"])
    assert load_settings(cfg, port=9003).port == 9003


def test_env_api_keys_are_comma_separated(monkeypatch):
    monkeypatch.setenv("SLIMSERVE_API_KEYS", "k1, k2")
    assert load_settings().api_keys == ["k1", "k2"]


@pytest.mark.parametrize(
    "yaml_text, setting",
    [("port: 70000\n", "port"), ("dtype: int3\n", "dtype"), ("max_num_seqs: 0\n", "max_num_seqs"),
     ("prot: 1\n", "prot"), ("- a\n- b\n", "config"), ("port: [\n", "config")],
)
def test_bad_yaml_values_name_the_setting(tmp_path, yaml_text, setting):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert err.value.setting == setting
    assert f"'{setting}'" in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "nope.yaml")


def test_cli_fails_fast_naming_the_setting(tmp_path):
    r = subprocess.run([sys.executable, "-m", "server", "serve", "--model", str(tmp_path / "missing")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "invalid setting 'model'" in r.stderr
    r = subprocess.run([sys.executable, "-m", "server", "serve"], env={"SLIMSERVE_PORT": "abc", "PATH": ""},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "invalid setting 'port'" in r.stderr


def test_per_model_settings_are_declared_once(tmp_path):
    """Every setting of server/model_settings.py is a top-level setting, a field of a `models:` entry (or a
    key of its `quantization:` mapping) and a serve flag; an entry's own value wins over the top level."""
    import argparse

    from server import cli
    from server.model_config import ModelEntry, QuantizationRecipe
    from server.model_settings import MODEL_SETTINGS
    from server.settings import ServeSettings

    sub = argparse.ArgumentParser().add_subparsers()
    cli._serve_parser(sub)
    flags = {a.dest for a in sub.choices["serve"]._actions}
    for s in MODEL_SETTINGS:
        assert s.name in ServeSettings.model_fields
        assert (s.recipe in QuantizationRecipe.model_fields) if s.recipe not in (None, "method") \
            else s.name in ModelEntry.model_fields
        assert (s.name in flags) == s.flag
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("quant_bits: 3\nmax_num_seqs: 5\nmodels:\n"
                   "  - {name: a, max_num_seqs: 2, quantization: {method: rtn, bits: 8}}\n  - {name: b}\n")
    s = load_settings(cfg)
    a, b = (s.for_entry(e) for e in s.entries())
    assert (a.quantization, a.quant_bits, a.max_num_seqs, a.model_id) == ("rtn", 8, 2, "a")
    assert (b.quantization, b.quant_bits, b.max_num_seqs, b.model_id) == (None, 3, 5, "b")
