"""Why does an AWQ artifact lose to RTN? Two checks on artifacts of the same model.

1. Export and kernel: each quantized linear's effective weight is read back through the loaded
   module itself (its output on the identity matrix), so no unpacking code of ours can be wrong;
   a plain fp32 copy of the model with those weights (and the artifact's own norms, where AWQ
   folded its scales) must give the artifact's logits. If not, the loss is in packing or kernel.
2. Where the error goes: per linear, the activation-weighted weight error
   sum_ij E[x_j^2] (W_q - W)_ij^2 / sum_ij E[x_j^2] W_ij^2, a proxy of the output error each layer
   adds, on calibration activations of the original model. AWQ multiplies weight columns by s and
   divides the layer's input by s; s is recovered per column by least squares (W_q . W / W . W),
   and W_q / s is compared in the original space, so AWQ and RTN are measured alike.

    python -m tests.bench.awq_diagnose REF --calib genesis.txt --text john.txt ART1 ART2 ... [--out f.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def effective_weights(model) -> dict[str, torch.Tensor]:
    """name -> [out, in] weight as the loaded (quantized) module computes with it."""
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "qweight"):
            eye = torch.eye(mod.in_features, dtype=torch.float32)
            with torch.no_grad():
                y = mod(eye).float()
            bias = getattr(mod, "bias", None)
            if bias is not None:
                y = y - bias.float()
            out[name] = y.T.contiguous()
    return out


def input_second_moments(model, windows) -> dict[str, torch.Tensor]:
    sums, counts, hooks = {}, {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            def hook(_m, args, name=name):
                x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
                counts[name] = counts.get(name, 0) + x.shape[0]
            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for w in windows:
            model(w)
    for h in hooks:
        h.remove()
    return {n: sums[n] / counts[n] for n in sums}


def diagnose(ref: str, artifacts: list[str], calib: Path, text: Path, tokens: int = 4096) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.evaluate import kl_and_agreement, logits_over, perplexity, token_windows

    tok = AutoTokenizer.from_pretrained(ref)
    base = AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32).eval()
    calib_windows = token_windows(tok, calib.read_text(), 256, tokens)
    held_out = token_windows(tok, text.read_text(), 256, tokens)
    moments = input_second_moments(base, calib_windows)
    ref_logits = logits_over(base, held_out)
    originals = {n: m.weight.detach().float() for n, m in base.named_modules()
                 if isinstance(m, torch.nn.Linear) and ".layers." in n}
    result = {"reference": ref, "reference_ppl": perplexity(ref_logits, held_out), "artifacts": {}}
    for art in artifacts:
        q = AutoModelForCausalLM.from_pretrained(art, dtype=torch.float32, device_map="cpu").eval()
        q_logits = logits_over(q, held_out)
        eff = effective_weights(q)
        # the artifact's model with its quantized linears as plain fp32 weights
        plain = AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32).eval()
        own = {k: v for k, v in q.state_dict().items() if not any(k.startswith(n + ".") for n in eff)}
        plain.load_state_dict({**plain.state_dict(), **{k: v.float() for k, v in own.items()
                                                        if k in plain.state_dict()}})
        for n, w in eff.items():
            plain.get_submodule(n).weight.data.copy_(w)
        plain_logits = logits_over(plain, held_out)
        kernel_kl, kernel_agree = kl_and_agreement(q_logits, plain_logits)
        per_kind: dict[str, list[float]] = {}
        scale_spread: dict[str, list[float]] = {}
        for n, w_q in eff.items():
            w = originals[n]
            s = (w_q * w).sum(0) / (w * w).sum(0).clamp(min=1e-12)  # per input column
            w_back = w_q / s.clamp(min=1e-6)
            e2 = moments[n]
            err = float(((w_back - w).pow(2) * e2).sum() / (w.pow(2) * e2).sum())
            kind = n.rsplit(".", 1)[-1]
            per_kind.setdefault(kind, []).append(err)
            scale_spread.setdefault(kind, []).append(float(s.max() / s.min()))
        kl, agree = kl_and_agreement(ref_logits, q_logits)
        result["artifacts"][Path(art).name] = {
            "ppl": perplexity(q_logits, held_out), "kl_vs_ref": kl, "top1": agree,
            "kernel_vs_dequantized_kl": kernel_kl, "kernel_vs_dequantized_top1": kernel_agree,
            "dequantized_ppl": perplexity(plain_logits, held_out),
            "weighted_rel_error_by_kind": {k: sum(v) / len(v) for k, v in sorted(per_kind.items())},
            "weighted_rel_error_by_layer_down_proj": per_kind.get("down_proj"),
            "column_scale_max_over_min_by_kind": {k: sum(v) / len(v) for k, v in sorted(scale_spread.items())},
        }
        del q, plain
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("ref")
    p.add_argument("artifacts", nargs="+")
    p.add_argument("--calib", type=Path, required=True)
    p.add_argument("--text", type=Path, required=True)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    res = diagnose(a.ref, a.artifacts, a.calib, a.text, a.tokens)
    print(json.dumps(res, indent=1))
    if a.out:
        a.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
