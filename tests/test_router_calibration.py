"""`compress calibrate-router` and the `learned` policy: the pure pieces directly, the command on the
tiny teacher/student, and a server whose decisions match the saved router's own predictions."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import openai
import pytest
import yaml

from compress.cost import Cost, write_cost
from compress.router_calibration import curve, perfect_router_curve, pick, rouge_l, sweep
from compress.router_features import CheapFeatures, MiniLMFeatures
from compress.router_model import LearnedRouter, fit
from tests.conftest import ServerProcess
from tests.tiny_model import build_tiny_model

WORDS = ["Paris", "London", "weather", "fox", "model", "numbers", "capital", "world", "token", "dog"]


def test_rouge_l():
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    assert rouge_l("", "") == 1.0 and rouge_l("a", "") == 0.0
    assert rouge_l("a b c d", "x y z") == 0.0
    # LCS "a c" = 2; precision 2/3, recall 2/4
    assert rouge_l("a b c", "a x c y") == pytest.approx(2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4))


def test_curve_and_pick():
    scores = np.array([0.9, 0.8, 0.2, 0.1])
    agree = np.array([1.0, 0.9, 0.0, 0.2])
    points = curve(scores, agree, np.array([0.0, 0.5, 1.0]))
    assert points[0] == {"threshold": 0.0, "student_share": 1.0, "quality": pytest.approx(0.525)}
    assert points[1]["student_share"] == 0.5 and points[1]["quality"] == pytest.approx((1 + 0.9 + 1 + 1) / 4)
    assert points[2] == {"threshold": 1.0, "student_share": 0.0, "quality": 1.0}
    assert pick(points, 0.95, None)["threshold"] == 0.5  # most student share that keeps 95%
    assert pick(points, 0.95, 1.0)["threshold"] == 0.0


def test_curve_cost_saved():
    scores = np.array([0.9, 0.8, 0.2, 0.1])
    agree = np.array([1.0, 0.9, 0.0, 0.2])
    teacher, student = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.5, 0.5, 1.0, 1.0])  # seconds per answer
    learned = curve(scores, agree, np.array([0.0, 0.5, 1.0]), (teacher, student))
    assert [p["cost_saved"] for p in learned] == pytest.approx([1 - 3 / 10, 1 - (1 + 7) / 10, 0.0])
    # a cascade pays for every student answer, and for the teacher's where it escalates
    cascade = curve(scores, agree, np.array([0.0, 0.5, 1.0]), (teacher, student), cascade=True)
    assert [p["cost_saved"] for p in cascade] == pytest.approx([1 - 3 / 10, 1 - (3 + 7) / 10, 1 - (3 + 10) / 10])
    # at equal quality the cheaper point wins: here the learned router's 0.5 threshold, the cascade's none
    assert pick(learned, 0.95, None)["threshold"] == 0.5
    slower = [{**p, "cost_saved": -p["student_share"]} for p in learned]  # a student dearer than the teacher
    assert pick(slower, 0.95, None)["threshold"] == 1.0


def test_fit_learns_a_separable_rule(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    y = (x[:, 2] > 0).astype(float)
    w, b, mean, std = fit(x, y)
    router = LearnedRouter("cheap", w, b, mean, std, threshold=0.5)
    assert ((router.scores(x.astype(np.float32)) >= 0.5) == y).mean() > 0.95
    loaded = LearnedRouter.load(router.save(tmp_path).parent)
    assert np.allclose(loaded.scores(x.astype(np.float32)), router.scores(x.astype(np.float32)))


def test_features():
    cheap = CheapFeatures()(["What is 2 + 2?", "Tell me about Paris"])
    assert cheap.shape[0] == 2 and not np.allclose(cheap[0], cheap[1])
    emb = MiniLMFeatures()(["a cat sat on the mat", "a kitten sat on the rug", "quarterly tax filing rules"])
    assert emb.shape == (3, 384)
    assert emb[0] @ emb[1] > emb[0] @ emb[2]  # real sentence embeddings: similar meanings are closer


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("calib")
    student = build_tiny_model(folder / "student", seed=1, layers=1)
    write_cost(student, Cost(seconds_per_token=0.004))  # read from its manifest; the teacher's is given
    rows = [{"prompt": f"Tell me about the {a} and the {b}."} for a in WORDS for b in WORDS[:4]]
    (folder / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = folder / "router"
    r = subprocess.run([sys.executable, "-m", "server", "compress", "calibrate-router", str(out), "--teacher",
                        str(tiny_model_dir), "--student", str(student), "--prompts", str(folder / "prompts.jsonl"),
                        "--features", "cheap", "--max-tokens", "8", "--agree-threshold", "0.3",
                        "--teacher-cost", "0.01"],
                       capture_output=True, text=True, timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert r.returncode == 0, r.stderr[-2000:]
    return folder, student, out, r.stdout


def test_calibrate_router_writes_router_and_curves(calibrated):
    _, _, out, _ = calibrated
    manifest = json.loads((out / "router.json").read_text())
    assert manifest["num_prompts"] == 40 and manifest["holdout"] == 12
    assert manifest["features"] == "cheap" and len(manifest["weights"]) == len(manifest["mean"])
    for name in ("learned", "cascade"):
        points = manifest["curves"][name]
        assert any(p["student_share"] == 0.0 and p["quality"] == 1.0 for p in points)
        assert all(0.0 <= p["quality"] <= 1.0 for p in points)
    assert manifest["chosen"]["threshold"] == manifest["threshold"]
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 40 and all(a["rouge_l"] == pytest.approx(rouge_l(a["student"], a["teacher"]), abs=1e-4)
                                      for a in answers)
    assert (out / "curve.png").stat().st_size > 1000


def test_perfect_router_curve_bounds_any_routing():
    rng = np.random.default_rng(0)
    agreement = np.round(rng.uniform(0.0, 1.0, 40), 2)
    agreement[:12] = 1.0  # identical answers
    seconds = (rng.uniform(1.0, 3.0, 40), rng.uniform(0.2, 1.0, 40))
    perfect = perfect_router_curve(agreement, seconds)
    best = {p["student_share"]: p["quality"] for p in perfect}
    assert sorted(best) == sorted({float((agreement >= t).mean()) for t in agreement} | {0.0})
    for scores in (rng.uniform(0, 1, 40), -agreement, agreement + rng.normal(0, 0.2, 40)):  # other routers
        for point in curve(scores, agreement, sweep(scores), seconds):
            if point["student_share"] in best:
                assert best[point["student_share"]] >= point["quality"] - 1e-12
    most = max(p["student_share"] for p in perfect if p["quality"] >= 0.95)
    feasible = [float((agreement >= t).mean()) for t in np.unique(agreement)
                if np.where(agreement >= t, agreement, 1.0).mean() >= 0.95]
    assert most == max(feasible) > 0.3  # no crossing of the target skipped
    for scores in (rng.uniform(0, 1, 40), -agreement, agreement + rng.normal(0, 0.2, 40)):
        assert most >= max(p["student_share"] for p in curve(scores, agreement, sweep(scores)) if p["quality"] >= 0.95)
    assert pick(perfect, 0.95, None)["quality"] >= 0.95


def test_calibrate_router_prints_and_saves_the_perfect_router(calibrated):
    _, _, out, stdout = calibrated
    manifest = json.loads((out / "router.json").read_text())
    chosen = manifest["oracle"]["chosen"]
    assert chosen in manifest["curves"]["oracle"] and chosen["quality"] >= 0.95
    assert f"a perfect router: threshold {chosen['threshold']:.4g} sends {chosen['student_share']:.1%}" in stdout


def test_calibrate_router_reports_the_cost_it_saves(calibrated):
    _, _, out, stdout = calibrated
    manifest = json.loads((out / "router.json").read_text())
    assert manifest["costs"]["teacher"]["seconds_per_token"] == 0.01  # --teacher-cost
    assert manifest["costs"]["student"]["seconds_per_token"] == 0.004  # the student's manifest
    learned, cascade = manifest["curves"]["learned"], manifest["curves"]["cascade"]
    assert all(p["cost_saved"] == 0.0 for p in learned if p["student_share"] == 0.0)  # the teacher alone
    assert all(p["cost_saved"] < 0.0 for p in cascade if p["student_share"] == 0.0)  # the student paid for nothing
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    t, s = sum(a["teacher_tokens"] for a in answers), sum(a["student_tokens"] for a in answers)
    everything = next(p for p in learned if p["student_share"] == 1.0)  # held-out prompts only: close, not equal
    assert 0.0 < everything["cost_saved"] < 1.0 and t > 0 and s > 0
    chosen = manifest["chosen"]
    assert chosen["cost_saved"] == max(p["cost_saved"] for p in learned if p["quality"] >= 0.95)
    assert (f"learned: threshold {chosen['threshold']:.4g} sends {chosen['student_share']:.1%} of held-out prompts "
            f"to the student at quality {chosen['quality']:.3f} and saves {chosen['cost_saved']:.1%} of the teacher's "
            "cost") in stdout
    printed = json.loads(stdout[stdout.index("{\n"):stdout.index("\nlearned: ")])
    assert printed["chosen"]["cost_saved"] == chosen["cost_saved"]


def test_learned_policy_follows_the_saved_router(calibrated, tiny_model_dir):
    folder, student, out, _ = calibrated
    router = LearnedRouter.load(out)
    config = {"dtype": "float32", "models": [{"name": "teacher", "model": str(tiny_model_dir)},
                                             {"name": "student", "model": str(student)}],
              "router": {"default": "learned", "policies": {
                  "learned": {"type": "learned", "path": str(out), "student": "student", "teacher": "teacher",
                              "threshold": 0.5}}}}
    (folder / "serve.yaml").write_text(yaml.safe_dump(config))
    server = ServerProcess(["--config", str(folder / "serve.yaml")], log_path=folder / "server.log")
    try:
        server.wait_ready(180)
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=60)
        for a in WORDS:
            text = f"Is the {a} near?"
            raw = client.chat.completions.with_raw_response.create(
                model="auto", messages=[{"role": "user", "content": text}], max_tokens=2)
            p = router.student_probability(text)
            expected = "student" if p >= 0.5 else "teacher"
            assert raw.parse().model == expected
            assert f"{p:.3f}" in raw.headers["x-slimserve-route"]
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory, tiny_model_dir):
    """A real slimserve serving the tiny model twice: as `teacher`, and as `int8` quantized at load."""
    folder = tmp_path_factory.mktemp("served")
    config = {"dtype": "float32", "models": [{"name": "teacher", "model": str(tiny_model_dir)},
                                             {"name": "int8", "model": str(tiny_model_dir), "quantization": "int8"}]}
    (folder / "serve.yaml").write_text(yaml.safe_dump(config))
    rows = [{"prompt": f"Tell me about the {a} and the {b}."} for a in WORDS for b in WORDS[:2]]
    (folder / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    server = ServerProcess(["--config", str(folder / "serve.yaml")], log_path=folder / "server.log")
    server.wait_ready(180)
    yield folder, server
    server.stop()


def _calibrate_served(folder, server, out, *extra):
    return subprocess.run([sys.executable, "-m", "server", "compress", "calibrate-router", str(folder / out),
                           "--server", f"{server.base_url}/v1", "--prompts", str(folder / "prompts.jsonl"),
                           "--features", "cheap", "--max-tokens", "8", *extra],
                          capture_output=True, text=True, timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": ""})


def test_calibrate_router_against_a_server_uses_its_answers(tiny_server):
    """--server: both models answer as served. The same model as teacher and student agrees everywhere;
    the answers written are the server's own greedy answers, token counts from its usage."""
    folder, server = tiny_server
    r = _calibrate_served(folder, server, "same", "--teacher", "teacher", "--student", "teacher",
                          "--teacher-cost", "0.01", "--student-cost", "0.01")
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((folder / "same" / "router.json").read_text())
    assert manifest["agreement"]["share_agreeing"] == 1.0 and manifest["student"] == "teacher"
    answers = [json.loads(line) for line in (folder / "same" / "answers.jsonl").read_text().splitlines()]
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=60)
    for a in answers[:3]:
        got = client.chat.completions.create(model="teacher", messages=[{"role": "user", "content": a["prompt"]}],
                                             max_tokens=8, temperature=0)
        assert a["teacher"] == got.choices[0].message.content.strip() == a["student"]
        assert a["teacher_tokens"] == got.usage.completion_tokens
    assert "server" in manifest["settings"] and "api_key" not in manifest["settings"]

    r = _calibrate_served(folder, server, "int8", "--teacher", "teacher", "--student", "int8",
                          "--teacher-cost", "0.01", "--student-cost", "0.005")
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((folder / "int8" / "router.json").read_text())
    assert manifest["student"] == "int8" and manifest["costs"]["student"]["seconds_per_token"] == 0.005
    assert "learned: threshold" in r.stdout


def test_calibrate_router_against_a_server_refuses_clearly(tiny_server):
    folder, server = tiny_server
    r = _calibrate_served(folder, server, "nocost", "--teacher", "teacher", "--student", "int8")
    assert r.returncode != 0 and "give both costs" in r.stderr
    r = _calibrate_served(folder, server, "nomodel", "--teacher", "teacher", "--student", "nope",
                          "--teacher-cost", "0.01", "--student-cost", "0.005")
    assert r.returncode != 0 and "invalid setting 'server'" in r.stderr and "nope" in r.stderr
