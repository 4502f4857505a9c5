"""The RouteLLM curve for slimserve's router on SmolLM2 and its distilled student.

    python -m tests.bench.router_curve --student /tmp/router/student-kd \
        --train /tmp/router/train.jsonl --heldout /tmp/router/heldout.jsonl

1. `calibrate-router` on the training prompts (the learned router and the thresholds it picks).
2. Offline, on held-out prompts: both models answer; for the learned and cascade policies at every
   threshold, the student share against quality (mean ROUGE-L agreement of the served answers with the
   teacher's, teacher = 1.0).
3. Live: a real slimserve serving teacher, student and both policies at the calibrated thresholds;
   held-out prompts sent to `auto:learned` and `auto:cascade`; share and quality of what it served.
Every point also gives the share of the teacher's cost saved (each model's seconds per output token,
`--teacher-cost`/`--student-cost` or its manifest's, x the tokens of its answers; the live server's
from its `x-slimserve-route` headers). Writes tests/bench/figures/router_smollm2.json and .png (x axis:
cost saved), with the machine (`lscpu`) and the command.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from compress.router_calibration import (CalibrationConfig, answer, calibrate, curve, prompts_of, rouge_l, sweep,
                                         teacher_answers, write_answers)
from server.default_model import DEFAULT_MODEL_ID
from compress.router_features import featurizer
from compress.router_model import LearnedRouter
from tests.bench.models import local_model
from tests.bench.machine import describe, summary
from tests.bench.output import pyplot, save_figure

FIGURES = Path(__file__).parent / "figures"


def at(points: list[dict], threshold: float) -> dict:
    """The held-out point of the threshold calibration chose (the nearest swept one at or above it)."""
    above = [p for p in points if p["threshold"] >= threshold]
    return min(above, key=lambda p: p["threshold"]) if above else points[-1]


def variant(spec: str) -> dict:
    """A model entry's fields for a folder or `folder@int8` (quantized at load, as `compress eval` names it)."""
    folder, _, method = spec.partition("@")
    return {"model": folder, "quantization": method} if method else {"model": folder}


def live(args, teacher: str, router_dir: Path, cascade_threshold: float, prompts: list[str], work: Path,
         costs: dict) -> dict:
    import openai

    from tests.bench.server_arg import serving

    config = {"max_num_seqs": 8, "dtype": "float32", "models": [
                  {"name": "teacher", "model": teacher, "cost": costs["teacher"]},
                  {"name": "student", **variant(args.student), "cost": costs["student"]}],
              "router": {"default": "learned", "policies": {
                  "learned": {"type": "learned", "path": str(router_dir), "student": "student", "teacher": "teacher"},
                  "cascade": {"type": "cascade", "student": "student", "teacher": "teacher",
                              "threshold": min(0.0, cascade_threshold), "metric": "mean_logprob"}}}}
    (work / "serve.yaml").write_text(yaml.safe_dump(config))
    out = {}
    with serving(["--config", str(work / "serve.yaml")], work / "server.log", timeout=300) as server:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=300)

        def ask(model: str, prompt: str):
            raw = client.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=args.max_tokens)
            return raw.parse(), raw.headers.get("x-slimserve-route", "")

        reference = [ask("teacher", p)[0].choices[0].message.content for p in tqdm(prompts, desc="live teacher")]
        for policy in ("learned", "cascade"):
            served, scores, saved, tokens = [], [], [], []
            for p, ref in tqdm(list(zip(prompts, reference)), desc=f"live auto:{policy}"):
                resp, header = ask(f"auto:{policy}", p)
                served.append(resp.model)
                scores.append(1.0 if resp.model == "teacher" else rouge_l(resp.choices[0].message.content, ref))
                fields = dict(part.split("=", 1) for part in header.split("; "))
                saved.append(float(fields["cost_saved"]))  # of this answer's tokens at the teacher's cost
                tokens.append(resp.usage.completion_tokens)
            out[policy] = {"prompts": len(prompts), "student_share": served.count("student") / len(served),
                           "quality": float(np.mean(scores)),
                           "cost_saved": float(np.dot(saved, tokens) / max(1, sum(tokens)))}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default=DEFAULT_MODEL_ID)
    ap.add_argument("--student", required=True)
    ap.add_argument("--train", type=Path, required=True)
    ap.add_argument("--heldout", type=Path, required=True)
    ap.add_argument("--train-answers", type=Path, help="teacher answers to the training prompts (chat JSONL)")
    ap.add_argument("--heldout-answers", type=Path, help="teacher answers to the held-out prompts (chat JSONL)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/router/bench"))
    ap.add_argument("--features", default="minilm")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--agree-threshold", type=float, default=0.5)
    ap.add_argument("--target-quality", type=float, default=0.95)
    ap.add_argument("--max-train", type=int, default=300)
    ap.add_argument("--max-heldout", type=int, default=200)
    ap.add_argument("--live-prompts", type=int, default=60)
    ap.add_argument("--teacher-cost", type=float, help="seconds per output token (default: manifest, else measured)")
    ap.add_argument("--student-cost", type=float, help="seconds per output token (default: manifest, else measured)")
    ap.add_argument("--out", type=Path, default=FIGURES / "router_smollm2.json")
    args = ap.parse_args(argv)
    teacher = local_model(args.teacher)
    args.work.mkdir(parents=True, exist_ok=True)

    train_file = args.work / "train.jsonl"
    train_file.write_text("\n".join(json.dumps({"prompt": p}) for p in prompts_of(args.train)[: args.max_train]))
    router_dir = args.work / "router"
    report = calibrate(CalibrationConfig(teacher=Path(teacher), student=Path(args.student), prompts=train_file,
                                         out=router_dir, features=args.features, max_tokens=args.max_tokens,
                                         agree_threshold=args.agree_threshold, target_quality=args.target_quality,
                                         teacher_answers=args.train_answers, teacher_cost=args.teacher_cost,
                                         student_cost=args.student_cost))
    costs = report["costs"]
    router = LearnedRouter.load(router_dir)

    held = prompts_of(args.heldout)[: args.max_heldout]
    t_ans = teacher_answers(CalibrationConfig(teacher=Path(teacher), student=Path(args.student), prompts=args.heldout,
                                              out=args.work, max_tokens=args.max_tokens,
                                              teacher_answers=args.heldout_answers), held)
    write_answers(args.work / "heldout_teacher_answers.jsonl", held, t_ans)  # --heldout-answers of a rerun
    s_ans = answer(Path(args.student), held, args.max_tokens, 8, "held-out student")
    write_answers(args.work / "heldout_student_answers.jsonl", held, s_ans)
    exact = np.array([s.text.strip() == t.text.strip() for s, t in zip(s_ans, t_ans)])
    agreement = np.array([rouge_l(s.text, t.text) for s, t in zip(s_ans, t_ans)])
    learned_scores = router.scores(featurizer(args.features)(held))
    confidence = np.array([s.mean_logprob for s in s_ans])
    seconds = (np.array([a.tokens for a in t_ans]) * costs["teacher"]["seconds_per_token"],
               np.array([a.tokens for a in s_ans]) * costs["student"]["seconds_per_token"])
    curves = {"learned": curve(learned_scores, agreement, sweep(learned_scores), seconds),
              "cascade": curve(confidence, agreement, sweep(confidence), seconds, cascade=True)}
    chosen = {"learned": at(curves["learned"], router.threshold),
              "cascade": at(curves["cascade"], report["cascade"]["chosen"]["threshold"])}
    best = {name: max([p for p in pts if p["quality"] >= args.target_quality] or [{"student_share": 0.0}],
                      key=lambda p: p["student_share"])["student_share"] for name, pts in curves.items()}
    best_saved = {name: max([p["cost_saved"] for p in pts if p["quality"] >= args.target_quality] or [0.0])
                  for name, pts in curves.items()}
    machine = describe()
    result = {
        "command": "python -m tests.bench.router_curve " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine, "costs": costs,
        "teacher": teacher, "student": args.student, "features": args.features, "max_tokens": args.max_tokens,
        "agreement": {"metric": "rouge_l_f1", "label_threshold": args.agree_threshold,
                      "heldout_mean": float(agreement.mean()),
                      "heldout_share_agreeing": float((agreement >= args.agree_threshold).mean()),
                      "heldout_exact_match": float(exact.mean())},
        "calibration": {k: report[k] for k in ("num_prompts", "holdout", "train_accuracy", "chosen", "cascade")},
        "heldout": {"prompts": len(held), "curves": curves, "at_calibrated_threshold": chosen,
                    f"max_student_share_at_quality_{args.target_quality}": best,
                    f"max_cost_saved_at_quality_{args.target_quality}": best_saved},
        "examples": [{"prompt": p, "teacher": t.text, "student": s.text, "rouge_l": round(float(a), 3)}
                     for p, t, s, a in list(zip(held, t_ans, s_ans, agreement))[:8]],
    }
    if args.live_prompts:
        result["live"] = live(args, teacher, router_dir, report["cascade"]["chosen"]["threshold"],
                              held[: args.live_prompts], args.work, costs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    _plot(args.out.with_suffix(".png"), curves, chosen, result.get("live", {}), args.target_quality,
          f"{Path(args.student).name} vs {Path(teacher).name}", f"{summary(machine)}\n{result['command']}")
    print(json.dumps({k: result[k] for k in ("agreement", "calibration", "costs")}, indent=2))
    print(json.dumps(result["heldout"]["at_calibrated_threshold"], indent=2), json.dumps(best),
          json.dumps(best_saved), result.get("live"))
    print(f"wrote {args.out}")
    return 0


def _plot(path: Path, curves: dict, chosen: dict, live_points: dict, target: float, pair: str, footer: str) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 5))
    x = "cost_saved"
    for name, label in (("learned", "learned router (MiniLM)"), ("cascade", "cascade (student mean logprob)")):
        pts = sorted(curves[name], key=lambda p: p[x])
        line, = ax.plot([p[x] for p in pts], [p["quality"] for p in pts], marker="o", ms=3, label=label)
        ax.plot([chosen[name][x]], [chosen[name]["quality"]], marker="*", ms=14, color=line.get_color())
        if name in live_points:
            ax.plot([live_points[name][x]], [live_points[name]["quality"]], marker="s", ms=8,
                    mfc="none", color=line.get_color(), label=f"{name}: live server")
    everything = max(curves["learned"], key=lambda p: p["student_share"])  # random routing: a straight line to it
    ax.plot([0, everything[x]], [1, everything["quality"]], ls=":", color="grey", label="random routing")
    ax.axhline(target, color="grey", ls="--", lw=1, label=f"{target:.0%} of teacher quality")
    ax.set_xlabel("share of the teacher's cost saved (seconds per output token x tokens)")
    ax.set_ylabel("quality: agreement with teacher (teacher = 1)")
    ax.set_title(f"Routing {pair}: cost saved vs quality", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path, footer, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
