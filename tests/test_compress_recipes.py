"""The recipes beyond plain GPTQ/AWQ/RTN on the tiny model: per-module bits, GPTQ's clipping search,
act-order with asymmetric groups of 32, auto-round, and AWQ's scale-1 / no-clip switches.

Each artifact must load in the PyTorch engine and stay close to the model (the same bound as
test_compress_quantize: a third of an unrelated model's KL), and each flag must show in what is
stored, so a flag that silently stops reaching the backend fails here.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from compress.bit_cost import artifact_bits, linear_modules, read_header
from compress.manifest import read_manifest
from compress.quantize import QuantizeError, QuantizeSpec, dynamic_overrides, quantize
from engine_run import greedy_tokens, mean_kl, prompt_logits
from server.engines.torch.engine import TorchEngine
from server.engines.vllm_kernels import schemes_for

TEXT = "\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog near river number {i}." for i in range(200))
EIGHT = "model.layers.0.mlp.down_proj"


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(TEXT)
    return path


RECIPES = {
    "gptq-plain": dict(method="gptq"),
    "gptq-mse": dict(method="gptq", mse=2.4),
    "gptq-8bit": dict(method="gptq", module_bits={EIGHT: 8}),
    "gptq-actorder-g32-asym": dict(method="gptq", act_order=True, group_size=32, sym=False),
    "rtn-8bit": dict(method="rtn", module_bits={EIGHT: 8}),
    "autoround-8bit": dict(method="autoround", iters=4, module_bits={EIGHT: 8}),
    "awq-scale-one-noclip": dict(method="awq", sym=False),  # the defaults: scale 1 searched, no clipping
}


@pytest.fixture(scope="module")
def made(tiny_model_dir, calib, tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    out = {}
    for name, kw in RECIPES.items():
        kw = {"group_size": 64, **kw}
        spec = QuantizeSpec(model=tiny_model_dir, out=root / name, calib=None if kw["method"] == "rtn" else calib,
                            num_samples=16, seq_len=64, **kw)
        out[name] = (root / name, quantize(spec))
    return out


@pytest.fixture(scope="module")
def reference_kl(tiny_model_dir, tmp_path_factory):
    from tiny_model import build_tiny_model

    ref = _logits(TorchEngine.load("ref", tiny_model_dir, dtype="float32"))
    other = _logits(TorchEngine.load("other", build_tiny_model(tmp_path_factory.mktemp("o") / "m", seed=1),
                                     dtype="float32"))
    return ref, _kl(ref, other)


def _logits(engine) -> torch.Tensor:
    return prompt_logits(engine, TEXT[:400])


_kl = mean_kl


MIXED = [n for n, kw in RECIPES.items() if kw.get("module_bits")]
# Mixed-bit artifacts load dequantized (compress/mixed_gptq.py): transformers + GPTQModel would build
# every GPTQ module at the top-level bits and fail on the 8-bit ones.
LOADS = list(RECIPES)


@pytest.mark.parametrize("name", LOADS)
def test_recipe_loads_generates_stays_close_and_reports_its_bits(made, reference_kl, name):
    folder, report = made[name]
    ref, unrelated = reference_kl
    engine = TorchEngine.load("q", folder, dtype="float32")
    kl = _kl(ref, _logits(engine))
    assert kl < 0.33 * unrelated, f"{name}: KL {kl:.4f} vs unrelated {unrelated:.4f}"
    asyncio.run(engine.start())  # the scheduler thread that generate() feeds
    try:
        assert len(greedy_tokens(engine, [("The capital of France is", None)], max_tokens=6)[0]) == 6
    finally:
        asyncio.run(engine.shutdown())
    manifest = read_manifest(folder)
    assert manifest["bits_per_weight"] == artifact_bits(folder)
    assert 4 < manifest["bits_per_weight"]["linear"] < 9
    assert manifest["module_bits"] == (RECIPES[name].get("module_bits") or {})


@pytest.mark.parametrize("name", MIXED)
def test_an_8bit_override_is_stored_at_8_bits_and_declared_for_the_loaders(made, name):
    folder, _ = made[name]
    stored = {m.name: m for m in linear_modules(folder)}
    header = read_header(next(folder.glob("*.safetensors")))
    packed_rows = {n: header[f"{n}.qweight"]["shape"][0] for n in stored}  # GPTQ: in_features * bits / 32
    assert packed_rows[EIGHT] == 256 * 8 // 32  # the tiny model's down_proj takes 256 inputs
    assert packed_rows["model.layers.1.mlp.down_proj"] == 256 * 4 // 32
    assert stored[EIGHT].bits_per_weight > 8 > stored["model.layers.1.mlp.down_proj"].bits_per_weight
    dynamic = json.loads((folder / "config.json").read_text())["quantization_config"]["dynamic"]
    assert [v["bits"] for k, v in dynamic.items() if "layers\\.0\\.mlp\\.down_proj" in k] == [8]
    # the vLLM probe sees the 8-bit modules (its CPU kernels run only 4-bit, so it sends these to torch)
    assert sorted(s.bits for s in schemes_for(None, json.loads((folder / "config.json").read_text()))) == [4, 8]


def test_dynamic_patterns_are_anchored():
    import re

    (pattern,) = dynamic_overrides({"model.layers.1.mlp.down_proj": 8})
    regex = re.compile(pattern[2:])
    assert regex.match("model.layers.1.mlp.down_proj")
    assert not regex.match("model.layers.11.mlp.down_proj") and not regex.match("model.layers.1.mlp.down_proj2")


def test_clipping_search_shrinks_ranges(made):
    """mse > 0 tries ranges down to 0.8x the group's: the stored scales can only shrink on average."""
    def mean_scale(folder):
        header_file = next(folder.glob("*.safetensors"))
        from safetensors import safe_open

        with safe_open(header_file, "pt") as f:
            return float(f.get_tensor("model.layers.1.mlp.up_proj.scales").float().mean())

    plain, mse = mean_scale(made["gptq-plain"][0]), mean_scale(made["gptq-mse"][0])
    assert mse < plain
    assert json.loads((made["gptq-mse"][0] / "config.json").read_text())["quantization_config"]["meta"]["mse"] == 2.4


def test_act_order_and_asymmetric_groups_reach_the_artifact(made):
    folder, _ = made["gptq-actorder-g32-asym"]
    cfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert cfg["desc_act"] is True and cfg["sym"] is False and cfg["group_size"] == 32
    from safetensors import safe_open

    with safe_open(next(folder.glob("*.safetensors")), "pt") as f:
        g_idx = f.get_tensor("model.layers.0.mlp.up_proj.g_idx")
    assert not bool((g_idx[1:] >= g_idx[:-1]).all())  # columns quantized out of order


def test_autoround_writes_gptq_that_vllm_would_take(made):
    folder, report = made["autoround-8bit"]
    cfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["provider"] == "auto-round" and cfg["iters"] == 4
    assert report["method"] == "autoround" and not list(folder.glob("*.autoround"))


def test_awq_scale_one_is_searched(made):
    _, report = made["awq-scale-one-noclip"]
    notes = report["backend_notes"]
    assert notes["scale_searches"] > 0 and 0 <= notes["unscaled_chosen"] <= notes["scale_searches"]


@pytest.mark.parametrize("change, message", [
    ({"module_bits": {"model.layers.0.mlp.nope": 8}}, "no linear layer"),
    ({"module_bits": {EIGHT: 5}}, "must be one of"),
    ({"module_bits": {EIGHT: 8}, "method": "awq"}, "module_bits applies"),
    ({"mse": 2.4, "method": "rtn"}, "mse"),
    ({"awq_clip": True}, "applies to --method awq"),
    ({"method": "autoround", "calib": None}, "needs calibration"),
])
def test_bad_recipes_fail_before_work(tiny_model_dir, tmp_path, calib, change, message):
    kw = {"method": "gptq", "group_size": 64, "calib": calib, **change}
    with pytest.raises(QuantizeError, match=message):
        quantize(QuantizeSpec(model=tiny_model_dir, out=tmp_path / "out", **kw))
    assert not (tmp_path / "out").exists()
