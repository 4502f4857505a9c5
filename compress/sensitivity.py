"""Which linear layers a model cannot afford to lose bits in: a sensitivity scan.

Each linear layer of the decoder blocks, alone, is rounded to the recipe's grid (RTN at the
recipe's bits, group size and symmetry: calibration-free, so the scan takes minutes, and it ranks
layers as GPTQ's error does) and the model's next-token distributions on calibration text are
compared with the unquantized model's: the mean KL is that layer's sensitivity. Only the blocks
from the changed one onward are recomputed, from block inputs captured once. The sum of the
layers' KLs is not the KL of quantizing them all (errors interact), but the ranking is what the
bit budget (compress/bit_budget.py) needs: where 8 bits buy the most KL per extra bit.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

from compress.prune import decoder_layers
from compress.quant_math import rtn_quantize


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    blocks = decoder_layers(model)
    return {f"model.layers.{i}.{n}": m for i, block in enumerate(blocks)
            for n, m in block.named_modules() if isinstance(m, nn.Linear)}


class BlockReplay:
    """Block inputs captured on one reference pass, so a change in block i reruns blocks i.. only."""

    def __init__(self, model: nn.Module, ids: torch.Tensor):
        self.model, self.blocks = model, decoder_layers(model)
        self.calls: list[tuple[tuple, dict]] = []
        hooks = [b.register_forward_pre_hook(self._capture, with_kwargs=True) for b in self.blocks]
        try:
            with torch.no_grad():
                self.reference = model(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)
        finally:
            for h in hooks:
                h.remove()

    def _capture(self, _module, args, kwargs):
        self.calls.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs)))

    @torch.no_grad()
    def logprobs_from(self, start: int) -> torch.Tensor:
        args, _ = self.calls[start]
        hidden = args[0]
        for i in range(start, len(self.blocks)):
            _, kwargs = self.calls[i]
            out = self.blocks[i](hidden, *args[1:], **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        inner = self.model.model
        return self.model.lm_head(inner.norm(hidden)).float().log_softmax(-1)


def mean_kl(reference: torch.Tensor, logprobs: torch.Tensor) -> float:
    """Mean KL(reference || variant) per position, both log-probabilities [.., vocab]."""
    kl = torch.nn.functional.kl_div(logprobs, reference, log_target=True, reduction="none").sum(-1)
    return float(kl.mean())


def scan(model_dir: Path, text_file: Path, *, bits: int = 4, group_size: int = 64, sym: bool = True,
         windows: int = 2, seq_len: int = 256, progress: bool = True) -> dict:
    """The KL each decoder linear layer costs when it alone is rounded to `bits`."""
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok.encode(Path(text_file).read_text(encoding="utf-8"), add_special_tokens=False)[: windows * seq_len]
    if len(ids) < windows * seq_len:
        raise ValueError(f"{text_file} has {len(ids)} tokens; the scan needs {windows * seq_len}")
    batch = torch.tensor(ids).view(windows, seq_len)
    replay = BlockReplay(model, batch)
    rows = []
    for name, layer in tqdm(linear_layers(model).items(), desc="sensitivity scan", unit="layer", disable=not progress):
        block = int(name.split(".")[2])
        original = layer.weight.data
        layer.weight.data = rtn_quantize(original, bits=bits, group_size=group_size, sym=sym)
        try:
            kl = mean_kl(replay.reference, replay.logprobs_from(block))
        finally:
            layer.weight.data = original
        rows.append({"name": name, "in_features": layer.in_features, "out_features": layer.out_features,
                     "weights": layer.in_features * layer.out_features, "kl": kl})
    return {"model": str(model_dir), "text": str(text_file), "tokens": windows * seq_len,
            "recipe": {"method": "rtn", "bits": bits, "group_size": group_size, "sym": sym},
            "seconds": round(time.perf_counter() - started, 1), "modules": rows}


def write_scan(result: dict, out: Path) -> None:
    """scan.json and a heatmap (blocks x projections) beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["modules"]
    kinds = list(dict.fromkeys(r["name"].split(".", 3)[3] for r in rows))
    blocks = 1 + max(int(r["name"].split(".")[2]) for r in rows)
    grid = torch.full((len(kinds), blocks), float("nan"))
    for r in rows:
        grid[kinds.index(r["name"].split(".", 3)[3]), int(r["name"].split(".")[2])] = r["kl"]
    fig, ax = plt.subplots(figsize=(max(6, blocks * 0.3), 3.2))
    im = ax.imshow(grid.log10().numpy(), aspect="auto", cmap="magma")
    ax.set_yticks(range(len(kinds)), kinds, fontsize=8)
    ax.set_xlabel("decoder block")
    r = result["recipe"]
    ax.set_title(f"KL when one layer alone is rounded to {r['bits']} bits (group {r['group_size']}), log10", fontsize=9)
    fig.colorbar(im, ax=ax, label="log10 KL")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
