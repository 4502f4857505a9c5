"""Mixed precision chosen by measurement, on the tiny model: the sensitivity scan finds the layer
that was made fragile, and the budget puts 8 bits where the scan says they buy the most."""

from __future__ import annotations

import pytest
import torch

from compress.bit_budget import BudgetError, average_bits, plan
from compress.sensitivity import scan, write_scan
from tests.tiny_model import build_tiny_model

TEXT = " ".join(f"The quick brown fox number {i} jumps over the lazy dog and runs to the river." for i in range(200))


@pytest.fixture(scope="module")
def fragile(tmp_path_factory):
    """A tiny model with one layer already on the 4-bit grid: rounding it again loses nothing, so the
    scan must find it harmless while every other layer costs something."""
    from transformers import AutoModelForCausalLM

    from compress.quant_math import rtn_quantize

    root = tmp_path_factory.mktemp("mixed")
    folder = build_tiny_model(root / "model", layers=2)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    w = model.model.layers[1].mlp.up_proj.weight
    with torch.no_grad():
        w.copy_(rtn_quantize(w, bits=4, group_size=32, sym=False))  # an asymmetric grid maps onto itself
    model.save_pretrained(folder)
    text = root / "calib.txt"
    text.write_text(TEXT)
    return folder, text


def test_scan_measures_each_layer_and_plots(fragile, tmp_path):
    folder, text = fragile
    result = scan(folder, text, bits=4, group_size=32, sym=False, windows=2, seq_len=64, progress=False)
    rows = sorted(result["modules"], key=lambda r: r["kl"])
    assert len(rows) == 2 * 7
    assert rows[0]["name"] == "model.layers.1.mlp.up_proj" and rows[0]["kl"] < 1e-6
    assert all(r["kl"] > 1e-4 for r in rows[1:])
    write_scan(result, tmp_path / "scan.json")
    assert (tmp_path / "scan.png").stat().st_size > 1000


def test_scan_matches_a_full_forward(fragile):
    """The replay from captured block inputs gives what a whole forward pass with the layer changed gives."""
    from transformers import AutoModelForCausalLM

    from compress.quant_math import rtn_quantize
    from compress.sensitivity import BlockReplay, mean_kl

    folder, _ = fragile
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(3, 300, (2, 32))
    replay = BlockReplay(model, ids)
    layer = model.model.layers[1].self_attn.v_proj
    layer.weight.data = rtn_quantize(layer.weight.data, bits=2, group_size=32)
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)
    assert torch.allclose(replay.logprobs_from(1), full, atol=1e-4)
    assert mean_kl(replay.reference, full) > 0


def _rows():
    kinds = [("a", 10.0), ("b", 1.0), ("c", 0.5), ("d", 0.01)]
    return {"modules": [{"name": n, "in_features": 64, "out_features": 64, "weights": 64 * 64, "kl": kl}
                        for n, kl in kinds]}


def test_budget_keeps_the_most_sensitive_and_respects_the_average():
    scan_rows = _rows()
    kept = plan(scan_rows, bits=4, group_size=32, keep_8bit=2)
    assert kept["module_bits"] == {"a": 8, "b": 8}
    # base: 4 + 20/32 + 32/64 = 5.125 bits; each 8-bit layer adds (4 + 4/32) / 4 = 1.03 to the average
    one = plan(scan_rows, bits=4, group_size=32, avg_bits=6.2)
    assert one["module_bits"] == {"a": 8} and one["planned_avg_bits"] <= 6.2
    assert one["planned_avg_bits"] == pytest.approx(average_bits(scan_rows["modules"], {"a": 8}, 4, 32), abs=1e-4)
    assert plan(scan_rows, bits=4, group_size=32, avg_bits=5.2)["module_bits"] == {}
    with pytest.raises(BudgetError, match="below what"):
        plan(scan_rows, bits=4, group_size=32, avg_bits=4.5)
    with pytest.raises(BudgetError, match="one of"):
        plan(scan_rows, bits=4, group_size=32)


def test_quantize_with_a_budget_stores_8_bits_where_the_scan_says(fragile, tmp_path):
    """End to end on GPTQModel: the plan's 8-bit layers are stored at 8 bits, the manifest's bits per
    weight (from the files) match the plan, and the artifact loads and generates in the PyTorch engine."""
    import asyncio
    import json
    import subprocess
    import sys

    from compress.bit_cost import linear_modules
    from compress.manifest import read_manifest

    folder, text = fragile
    out = tmp_path / "mixed"
    done = subprocess.run([sys.executable, "-m", "server", "compress", "quantize", str(folder), str(out),
                           "--method", "rtn", "--bits", "4", "--group-size", "32", "--asym", "--calib", str(text),
                           "--keep-8bit", "3"], capture_output=True, text=True, timeout=600,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = read_manifest(out)
    scan_rows = json.loads((out / "sensitivity.json").read_text())["modules"]
    top3 = {r["name"] for r in sorted(scan_rows, key=lambda r: r["kl"], reverse=True)[:3]}
    assert set(manifest["module_bits"]) == top3 and set(manifest["module_bits"].values()) == {8}
    stored = {m.name: m.bits_per_weight for m in linear_modules(out)}
    assert all(stored[n] > 8 for n in top3) and all(b < 6 for n, b in stored.items() if n not in top3)
    assert abs(manifest["bits_per_weight"]["linear"] - manifest["bit_budget"]["planned_avg_bits"]) < 0.01

    from server.engines.torch.engine import TorchEngine
    from tests.engine_run import greedy_tokens

    engine = TorchEngine.load("mixed", out, dtype="float32")
    asyncio.run(engine.start())  # the scheduler thread that generate() feeds
    try:
        assert len(greedy_tokens(engine, [("The capital of France is", None)], max_tokens=4)[0]) == 4
    finally:
        asyncio.run(engine.shutdown())
