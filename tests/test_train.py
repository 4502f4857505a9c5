"""`slimserve adapters train`: the three modes, loss masking, held-out loss falling, a servable result."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from adapters.loader import load_lora
from adapters.train import TrainConfig, train
from compress.data import IGNORE, read_records, tokenize
from compress.manifest import read_manifest
from tests.interrupt import stop_after_steps


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    rng = random.Random(0)
    rows = []
    for _ in range(60):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        rows.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                  {"role": "assistant", "content": f"Arr, {a} plus {b} be {a + b}, matey!"}]})
    path = tmp_path_factory.mktemp("data") / "pirate.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_chat_rows_train_only_on_assistant_tokens(tiny_model_dir, chat_data):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    example = tokenize(read_records(chat_data)[:1], tok, 256)[0]
    trained = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE]
    text = tok.decode(trained)
    assert text.startswith("Arr,") and text.rstrip("\n").endswith("matey!<|im_end|>")
    assert "What is" not in text and "assistant" not in text


def test_prompt_completion_and_text_rows(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "Hello", "completion": " world"}) + "\n" + json.dumps({"text": "abc " * 30}))
    examples = tokenize(read_records(path), tok, 16)
    pc = examples[0]
    assert tok.decode([t for t, label in zip(pc.input_ids, pc.labels) if label != IGNORE]).startswith(" world")
    assert all(len(e.input_ids) <= 16 for e in examples)
    assert examples[1].labels == examples[1].input_ids  # plain text trains on every token


def test_bad_data_file_is_a_clear_error(tmp_path):
    from compress.data import DataError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n{oops\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        read_records(bad)


def test_lora_training_lowers_held_out_loss_and_serves(tiny_model_dir, chat_data, tmp_path):
    out = tmp_path / "pirate"
    report = train(TrainConfig(base=str(tiny_model_dir), data=chat_data, out=out, rank=8, alpha=16, lr=3e-3,
                               max_steps=40, batch_size=8, eval_fraction=0.2, save_every=20, seq_len=64),
                   progress=False)
    assert report["held_out_loss"]["after"] < report["held_out_loss"]["before"] - 0.5
    assert (out / "checkpoints" / "step-20" / "adapter_model.safetensors").is_file()
    manifest = read_manifest(out)
    assert manifest["kind"] == "adapter" and manifest["mode"] == "lora" and manifest["steps"] == 40
    assert len(manifest["data_sha256"]) == 64

    from server.engines.torch.engine import TorchEngine

    engine = TorchEngine.load("tiny", tiny_model_dir, dtype="float32")
    weights = load_lora("pirate", out, engine.base_shapes(), max_rank=64)
    assert weights.rank == 8 and len(weights.modules) == 2 * 4  # 2 blocks x q,k,v,o


@pytest.mark.parametrize("mode", ["partial", "full"])
def test_partial_and_full_modes(tiny_model_dir, chat_data, tmp_path, mode):
    out = tmp_path / mode
    report = train(TrainConfig(base=str(tiny_model_dir), data=chat_data, out=out, mode=mode, last_n_blocks=1,
                               lr=1e-3, max_steps=5, batch_size=8, seq_len=64), progress=False)
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(out / "model.safetensors")
    first = "model.layers.0.self_attn.q_proj.weight"
    last = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(before[last], after[last])
    assert torch.equal(before[first], after[first]) == (mode == "partial")
    assert report["trainable_parameters"] > 0
    assert read_manifest(out)["kind"] == "model"


def test_cli_trains(tiny_model_dir, chat_data, tmp_path):
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "server", "adapters", "train", "--base", str(tiny_model_dir),
                        "--data", str(chat_data), "--out", str(out), "--max-steps", "3", "--batch-size", "4",
                        "--rank", "4", "--eval-every", "2", "--save-every", "2"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert [e["step"] for e in json.loads((out / "slimserve.json").read_text())["eval_history"]] == [0, 2, 3]
    r = subprocess.run([sys.executable, "-m", "server", "adapters", "train", "--base", str(tiny_model_dir),
                        "--data", str(chat_data), "--out", str(out), "--max-steps", "3", "--batch-size", "4",
                        "--rank", "8", "--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "invalid setting 'resume'" in r.stderr  # another recipe than the checkpoint's
    r = subprocess.run([sys.executable, "-m", "server", "adapters", "train", "--base", str(tmp_path),
                        "--data", str(chat_data), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "invalid setting 'base'" in r.stderr


def test_interrupted_lora_run_resumes_to_the_same_result(tiny_model_dir, chat_data, tmp_path, monkeypatch):
    def cfg(out, resume=False):
        return TrainConfig(base=str(tiny_model_dir), data=chat_data, out=out, rank=4, alpha=8, lr=3e-3, max_steps=8,
                           batch_size=4, seq_len=64, save_every=4, eval_every=4, resume=resume)

    whole = train(cfg(tmp_path / "whole"), progress=False)
    with monkeypatch.context() as m:
        stop_after_steps(m, 6)  # dies at step 7; checkpoint step-4 survives
        with pytest.raises(KeyboardInterrupt):
            train(cfg(tmp_path / "cut"), progress=False)
    assert not (tmp_path / "cut" / "slimserve.json").exists()
    resumed = train(cfg(tmp_path / "cut", resume=True), progress=False)
    manifest = read_manifest(tmp_path / "cut")
    assert manifest["steps"] == 8 and manifest["resumed_from_step"] == 4
    assert [e["step"] for e in manifest["eval_history"]] == [0, 4, 8]
    # dropout, data order and the LR schedule continue where they were: the same curve and result
    assert resumed["train_loss"]["curve"] == pytest.approx(whole["train_loss"]["curve"], abs=1e-3)
    assert resumed["held_out_loss"]["after"] == pytest.approx(whole["held_out_loss"]["after"], abs=1e-3)
    assert resumed["tokens"] == whole["tokens"]
