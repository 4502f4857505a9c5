"""`slimserve compress recipe` on the tiny model: prune -> distill -> quantize -> recovery -> eval in
order, every stage's artifact and manifest kept, a rerun resumes, a changed stage is redone with
everything after it, and the eval draws the frontier."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from compress.evaluate import frontier
from compress.manifest import read_manifest
from compress.recipe import RecipeError, load_recipe
from tests.tiny_model import build_tiny_model

TEXT = "\n\n".join(f"Passage {i}: the quick brown fox jumps over the lazy dog, number {i}." for i in range(60))


def _recipe(root, quant_bits: int) -> str:
    return f"""
model: {root / 'teacher'}
workdir: out
stages:
  - prune: {{drop_layers: 1, calib: text.txt, num_samples: 8, seq_len: 64}}
  - distill: {{data: text.txt, max_steps: 4, batch_size: 8, seq_len: 64, lr: 1.0e-3}}
  - quantize: {{method: rtn, bits: {quant_bits}, group_size: 32, sym: false}}
  - distill: {{data: text.txt, max_steps: 3, batch_size: 8, seq_len: 64, lr: 5.0e-4, temperature: 1.0}}
  - eval: {{text: held.txt, seq_len: 32, max_tokens: 256}}
"""


def _run(recipe):
    done = subprocess.run([sys.executable, "-m", "server", "compress", "recipe", str(recipe)], capture_output=True,
                          text=True, timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                                       "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def recipe_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    build_tiny_model(root / "teacher", layers=3)
    (root / "text.txt").write_text(TEXT)
    (root / "held.txt").write_text(" ".join(f"A lazy dog sleeps by river {i}." for i in range(80)))
    (root / "recipe.yaml").write_text(_recipe(root, 4))
    return root


def test_recipe_runs_every_stage_then_resumes_and_redoes_what_changed(recipe_dir):
    first = _run(recipe_dir / "recipe.yaml")
    out = recipe_dir / "out"
    kinds = [read_manifest(out / name)["kind"] for name in
             ("01-prune", "02-distill", "03-quantize", "04-distill", "05-eval")]
    assert kinds == ["pruned-model", "distilled-model", "quantized-model", "quantized-model", "evaluation"]
    assert read_manifest(out / "04-distill")["recovered_from"] == str(out / "03-quantize")
    report = json.loads((out / "05-eval" / "eval.json").read_text())["reports"]
    assert [r["name"] for r in report] == ["teacher", "01-prune", "02-distill", "03-quantize", "04-distill"]
    assert report[3]["bits_per_weight"] < 6 and report[0]["bits_per_weight"] > 15
    assert (out / "05-eval" / "eval.png").stat().st_size > 1000
    assert "running" in first

    again = _run(recipe_dir / "recipe.yaml")
    assert again.count("done earlier, kept") == 5 and "running" not in again

    (recipe_dir / "recipe.yaml").write_text(_recipe(recipe_dir, 8))
    changed = _run(recipe_dir / "recipe.yaml")
    assert changed.count("done earlier, kept") == 2  # prune and distill stay
    assert "stage 3/5 quantize: running" in changed and "stage 5/5 eval: running" in changed
    assert read_manifest(out / "03-quantize")["bits"] == 8


def test_bad_recipes_say_what_to_change(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: x\nstages:\n  - quantize: {method: gptq, bitz: 4}\n")
    with pytest.raises(RecipeError, match="unknown setting 'bitz'"):
        load_recipe(path)
    path.write_text("model: x\nstages:\n  - squash: {}\n")
    with pytest.raises(RecipeError, match="must be one of prune, distill, quantize, eval"):
        load_recipe(path)
    path.write_text("model: x\nstages:\n  - eval: {}\n")
    with pytest.raises(RecipeError, match="needs `text:`"):
        load_recipe(path)


def test_frontier_keeps_points_nothing_smaller_beats():
    sizes = [10, 20, 30, 40, 5]
    ppl = [15, 12, 13, 11, 30]
    assert frontier(sizes, ppl) == [4, 0, 1, 3]
