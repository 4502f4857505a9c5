"""`compress prune --contiguous N [--heal-steps S]`: the span chosen, the healing fit, the artifact."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from compress.manifest import read_manifest
from compress.prune_span import prune_span
from compress.span import angular_distance, choose_span, span_distances


@pytest.fixture(scope="module")
def six_layers(tmp_path_factory):
    """A 6-block tiny model whose blocks 2 and 3 are identities (attention and MLP outputs zeroed)."""
    from tiny_model import build_tiny_model

    folder = build_tiny_model(tmp_path_factory.mktemp("six") / "m", layers=6)
    weights = load_file(folder / "model.safetensors")
    for i in (2, 3):
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            weights[f"model.layers.{i}.{name}.weight"].zero_()
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def chat_calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "answers.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Question {i}: what do servers do with requests?"},
                          {"role": "assistant", "content": f"Answer {i}: they batch them, and adapters specialise "
                                                           f"the models that serve them, {i} times over."}]}
            for i in range(24)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_angular_distance_bounds():
    x = torch.randn(1, 5, 8)
    assert angular_distance(x, x) == pytest.approx(0.0, abs=1e-3)
    assert angular_distance(x, -x) == pytest.approx(1.0, abs=1e-3)
    assert angular_distance(x, 3 * x) == pytest.approx(0.0, abs=1e-3)


def test_span_scores_the_joint_change_not_each_block():
    """Block 1 adds v and block 2 takes it away: each block moves the stream a lot (per-block influence
    would keep both), but the span of blocks 1-2 as a whole changes nothing and is the one chosen."""
    torch.manual_seed(0)
    x0 = torch.randn(1, 6, 16)
    v = 3 * torch.randn(1, 6, 16)
    x1 = x0 + 0.3 * torch.randn_like(x0)  # block 0: a moderate change
    x2 = x1 + v  # block 1: large
    x3 = x2 - v  # block 2: large, undoes block 1
    x4 = x3 + 0.3 * torch.randn_like(x0)  # block 3: moderate
    x5 = x4 + 0.3 * torch.randn_like(x0)  # block 4: moderate (last)
    states = [x0, x1, x2, x3, x4, x5]
    d = span_distances(states, 2)
    assert len(d) == 4  # starts 0..3 of 5 blocks
    assert choose_span(d) == 1
    per_block = span_distances(states, 1)
    assert per_block[1] > per_block[0] and per_block[2] > per_block[3]  # each of 1, 2 alone is large
    with pytest.raises(ValueError, match="between 1 and 4"):
        span_distances(states, 5)


def test_choose_span_keeps_the_last_block_unless_it_is_the_only_choice():
    assert choose_span([0.5, 0.4, 0.1]) == 1
    assert choose_span([0.5, 0.4, 0.1], protect_last=False) == 2
    assert choose_span([0.3]) == 0


def test_prune_contiguous_picks_the_identity_span(six_layers, chat_calib, tmp_path):
    report = prune_span(six_layers, tmp_path / "p", calib=chat_calib, length=2)
    assert report["span"]["blocks"] == [2, 3]
    assert report["span"]["angular_distance"] == pytest.approx(0.0, abs=1e-3)
    others = [r["angular_distance"] for r in report["span_distances"] if r["start"] != 2]
    assert min(others) > 1e-2
    manifest = read_manifest(tmp_path / "p")
    assert manifest["method"] == "contiguous-span" and manifest["blocks_after"] == 4
    assert "heal" not in manifest


def test_healing_lowers_the_span_mse_and_the_artifact_loads(tiny_model_dir, chat_calib, tmp_path):
    from tiny_model import build_tiny_model
    from transformers import AutoModelForCausalLM

    five = build_tiny_model(tmp_path / "five", layers=5)
    report = prune_span(five, tmp_path / "healed", calib=chat_calib, length=3, heal_steps=40, heal_lr=1e-3)
    heal = report["heal"]
    mse = heal["held_out_mse"]
    assert mse["healed"] < mse["init_block"]
    assert mse["healed"] < mse["identity"]
    span = report["span"]["blocks"]
    assert heal["init_from_block"] == span[-1] and heal["steps"] == 40

    manifest = read_manifest(tmp_path / "healed")
    assert manifest["kind"] == "pruned-model"
    assert manifest["span"]["blocks"] == span and manifest["heal"]["steps"] == 40
    assert manifest["blocks_after"] == 3  # 5 - 3 + 1
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "healed")
    assert model.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    ids = torch.tensor([[1, 2, 3, 4]])
    out = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape[1] == 8

    # the fitted block is in the artifact (not the teacher's block it started from)
    before = load_file(five / "model.safetensors")
    after = load_file(tmp_path / "healed" / "model.safetensors")
    new_index = span[0]  # the replacement sits where the span began
    key = "model.layers.{}.mlp.down_proj.weight"
    assert not torch.equal(after[key.format(new_index)], before[key.format(span[-1])])


def test_cli_contiguous_heal_and_bad_requests(six_layers, chat_calib, tmp_path):
    base = [sys.executable, "-m", "server", "compress", "prune", str(six_layers)]
    r = subprocess.run([*base, str(tmp_path / "p"), "--contiguous", "2", "--heal-steps", "3", "--calib",
                        str(chat_calib)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "start   2: 0.0000" in r.stdout and r.stdout.count("dropped") == 1 and "healed: block 3" in r.stdout
    assert "(5 of 6 blocks)" in r.stdout
    r = subprocess.run([*base, str(tmp_path / "q"), "--drop-layers", "2", "--heal-steps", "3", "--calib",
                        str(chat_calib)], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "--heal-steps needs --contiguous" in r.stderr
    with pytest.raises(ValueError, match="between 1 and 5"):
        prune_span(six_layers, tmp_path / "x", calib=chat_calib, length=6)
