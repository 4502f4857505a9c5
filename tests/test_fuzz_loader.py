"""Fuzzing the adapter loader: malformed adapter_config.json and safetensors files either load or fail
with the loader's own AdapterError (a clear message and a reason) - never another exception type.

Self-contained and fast: a synthetic two-layer base (shapes only) and adapters written here.
SLIMSERVE_FUZZ_EXAMPLES raises the number of examples for a long run.
"""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from adapters.loader import CONFIG_FILE, WEIGHTS_FILE, AdapterError, LoRAWeights, check_finite, load_lora

EXAMPLES = int(os.environ.get("SLIMSERVE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize=not os.environ.get("SLIMSERVE_FUZZ_EXAMPLES"),
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
SHAPES = {m: (16, 16) for m in MODULES}  # module: (in, out)
RANK = 4
GOOD_CONFIG = {"peft_type": "LORA", "r": RANK, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
               "bias": "none", "base_model_name_or_path": "tiny"}
CONFIG_KEYS = [*GOOD_CONFIG, "use_dora", "fan_in_fan_out", "modules_to_save", "rank_pattern", "alpha_pattern",
               "use_rslora"]


def _good_tensors() -> dict[str, torch.Tensor]:
    out = {}
    for m in MODULES:
        out[f"base_model.model.{m}.lora_A.weight"] = torch.randn(RANK, 16)
        out[f"base_model.model.{m}.lora_B.weight"] = torch.randn(16, RANK)
    return out


def _load(folder) -> LoRAWeights | None:
    """The property: success, or AdapterError with a reason and a message. Anything else fails the test."""
    try:
        weights = load_lora("fuzzed", folder, SHAPES, max_rank=64)
        check_finite(weights)
        return weights
    except AdapterError as exc:
        assert exc.reason and str(exc) and exc.status in (400, 403, 404), (exc.reason, exc.status)
        return None


@pytest.fixture()
def folder(tmp_path):
    d = tmp_path / "adapter"
    d.mkdir()
    save_file(_good_tensors(), str(d / WEIGHTS_FILE))
    (d / CONFIG_FILE).write_text(json.dumps(GOOD_CONFIG))
    return d


def test_the_unfuzzed_adapter_loads(folder):
    assert _load(folder) is not None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
configs = st.one_of(
    json_values,  # not even an object
    st.dictionaries(st.sampled_from(CONFIG_KEYS) | st.text(max_size=8), json_values, max_size=8),
    st.builds(lambda changes: {**GOOD_CONFIG, **changes},  # one good config, a few values changed
              st.dictionaries(st.sampled_from(CONFIG_KEYS), json_values | st.text(max_size=20), max_size=3)),
)


@FUZZ
@given(cfg=configs)
@example(cfg={**GOOD_CONFIG, "target_modules": "(unclosed"})  # a string target is a regex in PEFT
@example(cfg={**GOOD_CONFIG, "target_modules": "*proj"})
@example(cfg={**GOOD_CONFIG, "lora_alpha": float("nan")})
@example(cfg={**GOOD_CONFIG, "r": 2**80})
def test_fuzzed_config(folder, cfg):
    (folder / CONFIG_FILE).write_text(json.dumps(cfg))
    _load(folder)


@FUZZ
@given(raw=st.binary(max_size=200))
@example(raw=b"[" * 100_000 + b"]" * 100_000)  # nesting deep enough to overflow a recursive parser
@example(raw=b"\xff\xfe{}")
@example(raw=b'{"r": 1e999}')
def test_raw_config_bytes(folder, raw):
    (folder / CONFIG_FILE).write_bytes(raw)
    _load(folder)


def _write_weights(folder, header: dict, data: bytes, length: int | None = None) -> None:
    raw = json.dumps(header).encode()
    n = len(raw) if length is None else length
    (folder / WEIGHTS_FILE).write_bytes(struct.pack("<Q", n) + raw + data)


dims = st.integers(-2, 40) | st.sampled_from([2**31, 2**63, True]) | st.floats(allow_nan=False) | st.text(max_size=2)
entries = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "?"]) | json_values,
    "shape": st.lists(dims, max_size=4) | json_values,
    "data_offsets": st.lists(st.integers(-5, 2**64) | st.sampled_from([0, 64, 256, 512]), max_size=3) | json_values,
})
tensor_names = st.sampled_from([f"base_model.model.{m}.lora_{ab}.weight" for m in MODULES for ab in "AB"]
                               + ["__metadata__", "base_model.model.lm_head.lora_A.weight", "x"]) | st.text(max_size=30)
headers = st.dictionaries(tensor_names, entries | json_values, max_size=6)


@FUZZ
@given(header=headers, data=st.binary(max_size=600))
def test_fuzzed_safetensors_header(folder, header, data):
    _write_weights(folder, header, data)
    _load(folder)


@FUZZ
@given(key=st.sampled_from(sorted(_good_tensors())), field=st.sampled_from(["dtype", "shape", "data_offsets"]),
       value=json_values | st.lists(st.integers(-3, 2**64), max_size=3))
def test_one_field_of_a_good_header_changed(folder, key, field, value):
    raw = (folder / WEIGHTS_FILE).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header[key][field] = value
    _write_weights(folder, header, raw[8 + n:])
    _load(folder)


@FUZZ
@given(length=st.integers(0, 2**64 - 1) | st.integers(0, 300), cut=st.integers(0, 400))
@example(length=2**64 - 1, cut=400)
def test_bad_header_length_and_truncation(folder, length, cut):
    raw = (folder / WEIGHTS_FILE).read_bytes()
    (folder / WEIGHTS_FILE).write_bytes((struct.pack("<Q", length) + raw[8:])[:cut])
    _load(folder)


def test_deeply_nested_safetensors_header(folder):
    raw = b"[" * 200_000 + b"]" * 200_000
    (folder / WEIGHTS_FILE).write_bytes(struct.pack("<Q", len(raw)) + raw)
    assert _load(folder) is None
