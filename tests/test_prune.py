"""`slimserve compress prune`: block influence, exactly the chosen blocks removed, still generates."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from compress.manifest import read_manifest
from compress.prune import drop_layers, influence, prune
from server.engines.torch.engine import TorchEngine


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    from tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("four") / "m", layers=4)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "c.txt"
    path.write_text("\n\n".join(f"Passage {i}: servers batch requests; adapters specialise models." for i in range(20)))
    return path


def test_influence_is_zero_for_identity_and_grows_with_change():
    x = torch.randn(2, 5, 8)
    assert abs(influence(x, x)) < 1e-6
    assert influence(x, -x) == pytest.approx(2.0)
    assert 0 < influence(x, x + 0.5 * torch.randn_like(x)) < influence(x, torch.randn_like(x))


def test_prune_drops_exactly_the_lowest_influence_blocks(four_layers, calib, tmp_path):
    report = prune(four_layers, tmp_path / "pruned", calib=calib, drop=2)
    ranking = [r["block"] for r in report["ranking"]]
    dropped = sorted(ranking[:2])
    assert [d["block"] for d in report["dropped"]] == dropped
    assert read_manifest(tmp_path / "pruned")["blocks_after"] == 2

    before = load_file(four_layers / "model.safetensors")
    after = load_file(tmp_path / "pruned" / "model.safetensors")
    kept = [i for i in range(4) if i not in dropped]
    for new, old in enumerate(kept):  # the kept blocks, renumbered, with their weights unchanged
        key = "model.layers.{}.mlp.down_proj.weight"
        assert torch.equal(after[key.format(new)], before[key.format(old)].to(after[key.format(new)].dtype))
    assert not any(k.startswith(("model.layers.2.", "model.layers.3.")) for k in after)

    engine = TorchEngine.load("pruned", tmp_path / "pruned", dtype="float32")
    ids = torch.tensor([engine.encode("Hello")])
    out = engine.model.generate(ids, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert out.shape[1] == ids.shape[1] + 5


def test_drop_layers_renumbers_cache_indices(four_layers):
    from transformers import AutoModelForCausalLM

    model = drop_layers(AutoModelForCausalLM.from_pretrained(four_layers), [0, 2])
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    assert model.config.num_hidden_layers == 2


def test_bad_requests(four_layers, calib, tmp_path):
    with pytest.raises(ValueError, match="between 1 and 3"):
        prune(four_layers, tmp_path / "x", calib=calib, drop=4)
    with pytest.raises(ValueError, match="exactly one"):
        prune(four_layers, tmp_path / "x", calib=calib)


def test_cli_prints_the_ranking(four_layers, calib, tmp_path):
    r = subprocess.run([sys.executable, "-m", "server", "compress", "prune", str(four_layers), str(tmp_path / "p"),
                        "--keep-ratio", "0.5", "--calib", str(calib)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("dropped") == 2 and "2 of 4 blocks" in r.stdout
