"""Recovery of a quantized model by distillation: train a GPTQ artifact on its own grid.

Each quantized linear of the artifact becomes a `FakeQuantLinear`: its integer codes plus a
trainable offset in grid steps (a latent weight in grid units: with weights as the parameter, one
learning rate is far too small for large-scale groups and far too large for small ones), and the
artifact's scales (trainable only on
request: with Adam, a group's scale moves by about lr per step whatever its size, so small scales
change by percents per step; on SmolLM2 at lr 5e-5 that took the held-out KL from 0.15 to 3.4 in
60 steps); the forward
pass rounds the latent weight to the grid (straight-through estimator for the rounding, scales
rounded to fp16 as the artifact stores them) so the model that trains is, at every step, the
model the exported artifact holds. `compress distill --student ARTIFACT` trains it with KD from
the full-precision teacher; `export` writes the new codes and scales into a copy of the artifact
(compress/gptq_layout.py), leaving its format, zero points, group indices and every other tensor
as they were. Norms and embeddings stay frozen: they are stored in 16 bits and training them in
fp32 would make the exported model differ from the trained one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from compress.gptq_layout import QuantizedLinear

PARTS = ("qweight", "qzeros", "scales", "g_idx")


class RecoveryError(ValueError):
    pass


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


class FakeQuantLinear(nn.Module):
    """A quantized linear whose rounding trains: weight = s * (round(q0 - z + offset) + z clamped - z).

    The trainable `offset` is in grid steps, so one learning rate means the same for every group
    whatever its scale (as SignRound's rounding perturbation): offset 0 is the artifact itself,
    and a code flips when its offset passes +-0.5."""

    def __init__(self, q: QuantizedLinear, bias: torch.Tensor | None, train_scales: bool = True):
        super().__init__()
        self.bits, self.maxq = q.bits, 2**q.bits - 1
        self.out_features, self.in_features = q.codes.shape
        self.register_buffer("zeros", q.zeros.float())
        self.register_buffer("g_idx", q.g_idx.clone())
        self.register_buffer("codes", q.codes.float())
        self.offset = nn.Parameter(torch.zeros(self.out_features, self.in_features))
        self.register_buffer("scales0", q.scales.clone())
        # scales train in log space, divided by the grid's half-width: a step of lr moves the codes at
        # the grid's edge by about lr grid steps, as the offsets move (Adam steps every parameter by ~lr)
        self.log_scale = nn.Parameter(torch.zeros_like(q.scales), requires_grad=train_scales)
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)

    @property
    def scales(self) -> torch.Tensor:
        return self.scales0 * torch.exp(self.log_scale / (2 ** (self.bits - 1)))

    def _grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        scales = self.scales
        scales = scales + (scales.detach().half().float() - scales.detach())  # as stored: fp16
        return scales.t()[:, self.g_idx], self.zeros.t()[:, self.g_idx]

    def _codes(self, ste: bool) -> torch.Tensor:
        moved = self.codes + self.offset
        rounded = _round_ste(moved) if ste else torch.round(moved)
        return torch.clamp(rounded, 0, self.maxq)

    def quantized_weight(self) -> torch.Tensor:
        s, z = self._grid()
        return s * (self._codes(ste=True) - z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.quantized_weight().to(x.dtype), self.bias)

    @torch.no_grad()
    def export(self) -> QuantizedLinear:
        return QuantizedLinear(self._codes(ste=False).to(torch.int32), self.scales.detach().half().float(),
                               self.zeros.to(torch.int32), self.g_idx, self.bits)


def gptq_artifact(folder: Path) -> dict | None:
    """The quantization config of a GPTQ v1 artifact, None for anything else."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    qc = json.loads(path.read_text()).get("quantization_config") or {}
    return qc if qc.get("quant_method") == "gptq" else None


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def load_trainable(folder: Path, train_scales: bool = True) -> nn.Module:
    """The artifact as an fp32 model whose quantized linears are FakeQuantLinear, all else frozen."""
    from transformers import AutoConfig, AutoModelForCausalLM

    qc = gptq_artifact(folder)
    if qc is None:
        raise RecoveryError(f"{folder} is not a GPTQ artifact; recovery trains GPTQ-format models "
                            "(make one with `compress quantize --method gptq|rtn`)")
    if qc.get("checkpoint_format", qc.get("format", "gptq")) != "gptq":
        raise RecoveryError(f"{folder} is in the {qc.get('checkpoint_format')} layout; recovery reads GPTQ v1 ('gptq')")
    config = AutoConfig.from_pretrained(folder)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = _tensors(folder)
    prefixes = sorted(n[: -len(".qweight")] for n in tensors if n.endswith(".qweight"))
    plain = {n: t.float() for n, t in tensors.items() if not any(n.startswith(p + ".") for p in prefixes)}
    missing, unexpected = model.load_state_dict(plain, strict=False)
    if unexpected:
        raise RecoveryError(f"{folder}: tensors the model does not have: {unexpected[:3]}")
    for p in model.parameters():
        p.requires_grad_(False)
    for prefix in prefixes:
        parts = {k: tensors[f"{prefix}.{k}"] for k in PARTS}
        bits = parts["qweight"].shape[0] * 32 // parts["g_idx"].shape[0]
        parent_name, _, child = prefix.rpartition(".")
        parent = model.get_submodule(parent_name)
        bias = tensors.get(f"{prefix}.bias")
        setattr(parent, child, FakeQuantLinear(QuantizedLinear.from_tensors(parts, bits), bias, train_scales))
    left = [m for m in missing if not any(m.startswith(p + ".") for p in prefixes)]
    if left and not (config.tie_word_embeddings and left == ["lm_head.weight"]):
        raise RecoveryError(f"{folder}: no weights for {left[:3]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def fake_quant_layers(model: nn.Module) -> dict[str, FakeQuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


def export(model: nn.Module, artifact: Path, out: Path) -> None:
    """Copy the artifact to `out` with the trained codes and scales in place of its own."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    layers = {name: layer.export().to_tensors() for name, layer in fake_quant_layers(model).items()}
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(artifact).iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "slimserve.json":
            shutil.copy2(f, out / f.name)
    for f in sorted(Path(artifact).glob("*.safetensors")):
        with safe_open(f, "pt") as src:
            metadata = src.metadata()
            tensors = {n: src.get_tensor(n) for n in src.keys()}
        for n in tensors:
            prefix, _, part = n.rpartition(".")
            if prefix in layers and part in PARTS:
                tensors[n] = layers[prefix][part]
        save_file(tensors, out / f.name, metadata=metadata)
