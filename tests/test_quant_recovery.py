"""Recovery of a quantized model by KD (`compress distill --student GPTQ_ARTIFACT`) on the tiny model:
the trainable model starts as the artifact, KD lowers its KL to the teacher, and the exported
artifact holds exactly the trained model (same codes and scales; the same logits through the
GPTQ kernels, to their precision)."""

from __future__ import annotations

import pytest
import torch

from compress.distill import DistillConfig, distill
from compress.gptq_layout import QuantizedLinear, pack_cols, pack_rows, unpack_cols, unpack_rows
from compress.manifest import read_manifest
from compress.quant_recovery import RecoveryError, fake_quant_layers, load_trainable
from compress.quantize import QuantizeSpec, quantize
from tests.distill_pair import build_pair


@pytest.fixture(scope="module")
def rtn_artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("recovery")
    teacher, _, text = build_pair(root / "pair")
    out = root / "rtn"
    quantize(QuantizeSpec(model=teacher, out=out, method="rtn", bits=4, group_size=32, sym=False))
    return teacher, out, text


def _served_layer_error(trainable, folder) -> float:
    """Largest relative difference between each trainable layer and the same layer loaded from
    `folder` through transformers' GPTQ kernels (which compute in 16 bits: ~0.5% on their own)."""
    from transformers import AutoModelForCausalLM

    served = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu").eval()
    worst = 0.0
    for name, layer in fake_quant_layers(trainable).items():
        x = torch.randn(4, layer.in_features)
        with torch.no_grad():
            mine, theirs = layer(x), served.get_submodule(name)(x).float()
        worst = max(worst, float((mine - theirs).abs().max() / mine.abs().max()))
    return worst


def test_packing_round_trips():
    codes = torch.randint(0, 16, (64, 24), dtype=torch.int32)
    assert torch.equal(unpack_rows(pack_rows(codes, 4), 4), codes)
    assert torch.equal(unpack_cols(pack_cols(codes, 4), 4), codes)
    assert torch.equal(unpack_rows(pack_rows(codes % 4, 2), 2), codes % 4)


def test_trainable_model_starts_as_the_artifact(rtn_artifact):
    _, artifact, _ = rtn_artifact
    trainable = load_trainable(artifact)
    assert len(fake_quant_layers(trainable)) == 4 * 7
    assert _served_layer_error(trainable, artifact) < 0.02


def test_recovery_lowers_kl_and_exports_exactly_the_trained_model(rtn_artifact, tmp_path):
    teacher, artifact, text = rtn_artifact
    out = tmp_path / "recovered"
    report = distill(DistillConfig(teacher=teacher, student=artifact, out=out, data=text, max_steps=25, lr=0.01,
                                   batch_size=8, seq_len=64, temperature=1.0), progress=False)
    kl = report["recovery"]["held_out_kl_to_teacher"]
    assert kl["after"] < 0.9 * kl["before"]
    manifest = read_manifest(out)
    assert manifest["kind"] == "quantized-model" and manifest["method"] == "rtn"
    assert manifest["recovered_from"] == str(artifact) and manifest["bits_per_weight"]["linear"] < 5

    exported = load_trainable(out)
    before = load_trainable(artifact)
    changed = 0
    for name, layer in fake_quant_layers(exported).items():
        mine = layer.export()
        original = fake_quant_layers(before)[name].export()
        assert torch.equal(mine.zeros, original.zeros) and torch.equal(mine.g_idx, original.g_idx)
        changed += int((mine.codes != original.codes).sum()) + int((mine.scales != original.scales).sum())
        assert torch.equal(layer.quantized_weight(), mine.dequantize().float()) or torch.allclose(
            layer.quantized_weight(), mine.dequantize(), atol=1e-6)
    assert changed > 0  # training moved codes or scales
    assert _served_layer_error(exported, out) < 0.02  # and the serving kernels read it as written


def test_trained_weights_equal_the_export(rtn_artifact, tmp_path):
    """Bit-exact: the weights the trained model computes with are the exported artifact's."""
    teacher, artifact, _ = rtn_artifact
    model = load_trainable(artifact)
    with torch.no_grad():
        for layer in fake_quant_layers(model).values():
            layer.offset.add_(torch.randn_like(layer.offset) * 0.7)
            layer.log_scale.add_(0.1)
    from compress.quant_recovery import export

    export(model, artifact, tmp_path / "out")
    reloaded = fake_quant_layers(load_trainable(tmp_path / "out"))
    for name, layer in fake_quant_layers(model).items():
        assert torch.equal(layer.quantized_weight().detach(), reloaded[name].quantized_weight().detach())


def test_not_a_gptq_artifact_is_refused(rtn_artifact):
    teacher, _, _ = rtn_artifact
    with pytest.raises(RecoveryError, match="not a GPTQ artifact"):
        load_trainable(teacher)
