"""`slimserve compress distill` on tiny models: KD lowers the student's KL to the teacher,
sequence-level KD writes and reads its dataset, mismatched tokenizers are refused."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from compress.distill import DistillConfig, DistillError, distill, generate_dataset
from compress.manifest import read_manifest
from tests.distill_pair import build_pair
from tests.interrupt import stop_after_steps


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return build_pair(tmp_path_factory.mktemp("distill"))


def test_kd_lowers_kl_to_the_teacher(pair, tmp_path):
    teacher, student, text = pair
    report = distill(DistillConfig(teacher=teacher, student=student, out=tmp_path / "kd", data=text, max_steps=30,
                                   lr=1e-3, batch_size=8, seq_len=64, temperature=2.0), progress=False)
    kl = report["held_out_kl_to_teacher"]
    assert kl["after"] < 0.8 * kl["before"]
    manifest = read_manifest(tmp_path / "kd")
    assert manifest["method"] == "forward_kl" and manifest["steps"] == 30 and manifest["tokens"] > 0


def test_mismatched_tokenizers_are_refused(pair, tmp_path):
    import shutil

    teacher, student, text = pair
    other = shutil.copytree(student, tmp_path / "other")
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    first = next(iter(vocab))
    vocab[first + "-changed"] = vocab.pop(first)
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(DistillError, match="tokenizers differ"):
        distill(DistillConfig(teacher=teacher, student=other, out=tmp_path / "x", data=text, max_steps=1),
                progress=False)


def test_sequence_level_kd_writes_resumes_and_trains(pair, tmp_path):
    teacher, student, _ = pair
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"Tell me about number {i}."}) for i in range(5)))
    out = tmp_path / "answers.jsonl"
    generate_dataset(teacher, prompts, out, max_new_tokens=8, batch_size=2)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and all(r["messages"][1]["role"] == "assistant" for r in rows)
    generate_dataset(teacher, prompts, out, max_new_tokens=8, batch_size=2)  # resumes: nothing new to do
    assert len(out.read_text().splitlines()) == 5
    r = subprocess.run([sys.executable, "-m", "server", "compress", "distill", str(tmp_path / "seq"), "--teacher",
                        str(teacher), "--student", str(student), "--data", str(prompts), "--generate",
                        "--max-new-tokens", "8", "--max-steps", "2", "--batch-size", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert read_manifest(tmp_path / "seq")["method"] == "ce"


def test_interrupted_distill_resumes_and_its_curve_continues(pair, tmp_path, monkeypatch):
    teacher, student, text = pair

    def cfg(out, resume=False):
        return DistillConfig(teacher=teacher, student=student, out=out, data=text, max_steps=6, lr=1e-3,
                             batch_size=4, seq_len=64, save_every=3, eval_every=3, resume=resume)

    whole = distill(cfg(tmp_path / "whole"), progress=False)
    with monkeypatch.context() as m:
        stop_after_steps(m, 4)  # dies during step 5; the step-3 checkpoint survives
        with pytest.raises(KeyboardInterrupt):
            distill(cfg(tmp_path / "cut"), progress=False)
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["step-3"]
    resumed = distill(cfg(tmp_path / "cut", resume=True), progress=False)
    manifest = read_manifest(tmp_path / "cut")
    assert manifest["steps"] == 6 and manifest["resumed_from_step"] == 3 and manifest["tokens"] == whole["tokens"]
    assert [e["step"] for e in manifest["eval_history"]] == [0, 3, 6]
    assert all(e["kl"] > 0 and e["loss"] > 0 for e in manifest["eval_history"])
    assert len(resumed["train_loss"]["curve"]) == 6  # steps 1-3 come from the checkpoint, not restarted
    assert resumed["train_loss"]["curve"] == pytest.approx(whole["train_loss"]["curve"], abs=1e-3)
    assert resumed["held_out_kl_to_teacher"]["after"] == pytest.approx(whole["held_out_kl_to_teacher"]["after"],
                                                                        abs=1e-3)


def test_resume_refuses_a_changed_recipe(pair, tmp_path):
    from compress.training import ResumeError

    teacher, student, text = pair
    distill(DistillConfig(teacher=teacher, student=student, out=tmp_path, data=text, max_steps=2, batch_size=4,
                          seq_len=64, save_every=2), progress=False)
    with pytest.raises(ResumeError, match="differ in temperature"):
        distill(DistillConfig(teacher=teacher, student=student, out=tmp_path, data=text, max_steps=4, batch_size=4,
                              seq_len=64, temperature=4.0, resume=True), progress=False)
