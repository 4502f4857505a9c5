"""The top-k teacher cache: built once, a second student trains from it without loading the teacher
and gets closer to it; caches from other data, seq_len or tokenizer are refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import compress.distill
from compress.data import pad_batches, read_records, tokenize
from compress.distill import DistillConfig, DistillError, distill
from compress.distill_losses import forward_kl
from compress.manifest import read_manifest
from compress.teacher_cache import MANIFEST, TeacherCacheError
from tests.distill_pair import build_pair


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Teacher, pruned student, data and a cache made by a first distill run with --cache-teacher."""
    root = tmp_path_factory.mktemp("cache")
    teacher, _, text = build_pair(root)
    first = distill(DistillConfig(teacher=teacher, student=root / "student", out=root / "first", data=text,
                                  max_steps=2, batch_size=8, seq_len=64, cache_teacher=root / "topk", top_k=16),
                    progress=False)
    return teacher, root / "student", text, root / "topk", first


@torch.no_grad()
def true_kl(teacher, student, text) -> float:
    """Full-vocabulary forward KL (T=1) of a student to the teacher over the text's tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(student)
    t = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    s = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    ids, mask, _ = next(pad_batches(tokenize(read_records(text), tok, 64), 64, tok.pad_token_id))
    keep = mask[:, 1:].bool()
    return float(forward_kl(s(input_ids=ids, attention_mask=mask).logits[:, :-1][keep],
                            t(input_ids=ids, attention_mask=mask).logits[:, :-1][keep]))


def test_cache_holds_top_k_per_position(built):
    from safetensors.torch import load_file

    _, _, _, cache, first = built
    manifest = json.loads((cache / MANIFEST).read_text())
    assert manifest["k"] == 16 and manifest["seq_len"] == 64 and len(manifest["data_sha256"]) == 64
    shard = load_file(cache / manifest["shards"][0])
    assert shard["ids"].dtype == torch.int32 and shard["logprobs"].dtype == torch.float16
    assert shard["ids"].shape[1] == 16 and int(shard["lengths"].sum()) == manifest["positions"]
    assert shard["tail"].dtype == torch.float32 and len(shard["tail"]) == manifest["positions"]
    # top-k mass plus the tail's mass is the whole distribution
    total = shard["logprobs"].float().exp().sum(-1) + shard["tail"].exp()
    assert torch.allclose(total, torch.ones_like(total), atol=1e-2)
    assert 0.5 < manifest["mean_topk_mass"] <= 1.0
    assert first["teacher_source"].startswith("top-16 cache")


def test_second_student_trains_from_the_cache_without_the_teacher(built, tmp_path, monkeypatch):
    teacher, student, text, cache, _ = built

    def no_teacher(path):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(compress.distill, "_load_teacher", no_teacher)
    report = distill(DistillConfig(teacher=None, student=student, out=tmp_path / "s2", data=text, max_steps=30,
                                   lr=1e-3, batch_size=8, seq_len=64, teacher_cache=cache, eval_every=10),
                     progress=False)
    assert report["teacher"] == str(teacher) and report["steps"] == 30
    assert [e["step"] for e in report["eval_history"]] == [0, 10, 20, 30]
    kl = report["held_out_kl_to_teacher"]
    assert kl["measure"].startswith("top-16") and kl["after"] < kl["before"]
    # measured against the real teacher, over all vocabulary: the student got closer
    assert true_kl(teacher, tmp_path / "s2", text) < 0.8 * true_kl(teacher, student, text)


def test_caches_that_do_not_match_are_refused(built, tmp_path):
    teacher, student, text, cache, _ = built
    other = tmp_path / "other.txt"
    other.write_text(text.read_text() + "\n\nOne more passage.")

    def run(**kw):
        base = dict(teacher=None, student=student, out=tmp_path / "x", data=text, max_steps=1, batch_size=8,
                    seq_len=64, teacher_cache=cache)
        distill(DistillConfig(**{**base, **kw}), progress=False)

    with pytest.raises(TeacherCacheError, match="other data"):
        run(data=other)
    with pytest.raises(TeacherCacheError, match="--seq-len 64, not 32"):
        run(seq_len=32)
    with pytest.raises(TeacherCacheError, match="no teacher cache"):
        run(teacher_cache=tmp_path)
    with pytest.raises(DistillError, match="whole distribution"):
        run(loss="reverse_kl")
    changed = shutil.copytree(student, tmp_path / "changed")
    tok = json.loads((changed / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    first = next(iter(vocab))
    vocab[first + "-changed"] = vocab.pop(first)
    (changed / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(TeacherCacheError, match="tokenizer differs"):
        run(student=changed)


def test_cli_flags(built, tmp_path, capsys):
    from server.cli import main

    _, student, text, cache, _ = built
    common = ["compress", "distill", "--student", str(student), "--data", str(text), "--teacher-cache", str(cache)]
    assert main([*common, str(tmp_path / "a"), "--seq-len", "64", "--max-steps", "4", "--eval-every", "2",
                 "--save-every", "2"]) == 0
    manifest = read_manifest(tmp_path / "a")
    assert manifest["steps"] == 4 and [e["step"] for e in manifest["eval_history"]] == [0, 2, 4]
    assert "eval_kl=" in capsys.readouterr().err  # the progress bar shows the latest evaluation
    assert main([*common, str(tmp_path / "a"), "--seq-len", "64", "--max-steps", "6", "--resume"]) == 0
    manifest = read_manifest(tmp_path / "a")
    assert manifest["resumed_from_step"] == 4 and manifest["steps"] == 6
    assert len(manifest["train_loss"]["curve"]) == 6
    capsys.readouterr()
    assert main([*common, str(tmp_path / "b")]) == 2  # default --seq-len 256
    err = capsys.readouterr().err
    assert "invalid setting 'teacher-cache'" in err and "--seq-len 64" in err
    assert main(["compress", "distill", str(tmp_path / "c"), "--student", str(student), "--data", str(text)]) == 2
    assert "--teacher-cache" in capsys.readouterr().err
