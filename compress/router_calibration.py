"""`slimserve compress calibrate-router`: learn when the student's answer is good enough.

Both models answer every prompt (greedy); a student answer "agrees" when its word-level ROUGE-L F1
against the teacher's answer reaches `agree_threshold` (the teacher is the reference, as in
distillation: its own answers agree fully). A logistic regression over prompt features predicts
agreement; its threshold is picked on a held-out part of the prompts for a target student share or
a target quality (mean agreement of the served answers, teacher = 1.0). The same held-out part also
gives the cascade policy's curve (student confidence = mean token logprob), so both can be compared, and
the bound on both: a perfect router's curve (perfect_router_curve), which tells whether the router or
the student limits the share.

Each point also says what it saves: the teacher's cost of its own answers minus what the policy spends
(the student's answers it serves; a cascade pays for every student answer and the teacher's where it
escalates), as a share of the teacher's. A model's cost per token is `--teacher-cost`/`--student-cost`,
else its manifest's (compress/cost.py), else measured here. With costs, the threshold picked is the
one that saves most at the target quality.

With `server` (an OpenAI-compatible base URL), teacher and student are model names there and both
answer as served (compress/served_answers.py): the variants a server quantizes at load, on its own
kernels, are calibrated as they will really answer. Their costs must then be given.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from compress.data import last_turn, prompt_of, read_records
from compress.greedy import greedy_answers, load_generator
from compress.cost import cost_of
from compress.manifest import file_hash

SWEEP = 41  # thresholds per curve


@dataclass
class CalibrationConfig:
    teacher: Path | str  # a folder, or with `server` a model name there
    student: Path | str
    prompts: Path
    out: Path
    features: str = "minilm"
    max_tokens: int = 48
    batch_size: int = 8
    agree_threshold: float = 0.5
    target_quality: float = 0.95
    target_share: float | None = None
    holdout_fraction: float = 0.3
    seed: int = 0
    teacher_answers: Path | None = None  # JSONL of chat rows the teacher already answered (e.g. distillation data)
    teacher_cost: float | None = None  # seconds per output token; default: the manifest's, else measured
    student_cost: float | None = None
    server: str | None = None  # OpenAI-compatible base URL that serves teacher and student (names)
    api_key: str | None = None

    def __post_init__(self) -> None:
        if self.server and (self.teacher_cost is None or self.student_cost is None):
            raise ValueError("with a server, give both costs (--teacher-cost, --student-cost): measure them with "
                             "`slimserve compress cost MODEL [--quantization Q]` or `slimserve bench`")


@dataclass
class Answer:
    text: str
    mean_logprob: float
    min_logprob: float
    tokens: int = 0  # generated tokens, EOS included


def prompts_of(path: Path) -> list[str]:
    return [p for p in map(prompt_of, read_records(path)) if p.strip()]


def answer(model_path: Path, prompts: list[str], max_tokens: int, batch_size: int, desc: str,
           dtype: torch.dtype = torch.float32) -> list[Answer]:
    """Greedy chat answers with the logprob of each chosen token (what a cascade reads). fp32 by default:
    on CPUs without fast bf16 kernels for every op, bf16 generation is several times slower."""
    model, tok = load_generator(model_path, dtype)
    return [Answer(a.text.strip(), a.mean_logprob, a.min_logprob, a.tokens)
            for a in greedy_answers(model, tok, prompts, max_tokens, batch_size, desc=desc, logprobs=True)]


def answers_of(cfg: "CalibrationConfig", model: Path | str, prompts: list[str], desc: str) -> list[Answer]:
    """Greedy answers of `model`: from cfg.server as served (batch_size requests in flight), else offline."""
    if not cfg.server:
        return answer(Path(model), prompts, cfg.max_tokens, cfg.batch_size, desc)
    from compress.served_answers import served_answers

    return served_answers(cfg.server, str(model), prompts, cfg.max_tokens, cfg.batch_size, cfg.api_key, desc=desc)


def known_answers(path: Path) -> dict[str, tuple[str, int | None]]:
    """prompt -> (the assistant's answer, its tokens where the row gives `tokens`), from chat JSONL rows
    (the last user turn is the prompt)."""
    out = {}
    for row in read_records(path):
        msgs = row.get("messages") or []
        user, reply = last_turn(msgs, "user"), last_turn(msgs, "assistant")
        if user is not None and reply is not None:
            out[user] = (reply.strip(), row.get("tokens"))
    return out


def teacher_answers(cfg: "CalibrationConfig", prompts: list[str]) -> list[Answer]:
    """Reuse answers the teacher already wrote where given; generate the rest. A reused answer without a
    token count is counted with the teacher's tokenizer (+1 for EOS)."""
    known = known_answers(cfg.teacher_answers) if cfg.teacher_answers else {}
    if cfg.server:  # no tokenizer to count with: a reused answer must carry its tokens
        known = {p: a for p, a in known.items() if a[1] is not None}
    missing = [p for p in prompts if p not in known]
    fresh = dict(zip(missing, answers_of(cfg, cfg.teacher, missing, "teacher answers"))) if missing else {}
    tok = None
    if any(known[p][1] is None for p in prompts if p in known):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(cfg.teacher)

    def reused(text: str, tokens: int | None) -> Answer:
        return Answer(text, 0.0, 0.0,
                      tokens if tokens is not None else len(tok.encode(text, add_special_tokens=False)) + 1)

    return [fresh[p] if p in fresh else reused(*known[p]) for p in prompts]


def write_answers(path: Path, prompts: list[str], answers: list[Answer]) -> None:
    """Chat JSONL with `tokens`, which `teacher_answers` reuses."""
    with path.open("w") as f:
        for p, a in zip(prompts, answers):
            f.write(json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a.text}],
                                "tokens": a.tokens}) + "\n")


def seconds_per_token(folder: Path, given: float | None) -> dict:
    """The cost used for a model: as given, else its manifest's, else measured now."""
    return {"seconds_per_token": given, "measured": "given"} if given is not None else cost_of(folder)


def rouge_l(candidate: str, reference: str) -> float:
    """Word-level ROUGE-L F1 (longest common subsequence), case-insensitive."""
    a, b = candidate.lower().split(), reference.lower().split()
    if not a and not b:
        return 1.0
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def curve(scores: np.ndarray, agreement: np.ndarray, thresholds: np.ndarray,
          seconds: tuple[np.ndarray, np.ndarray] | None = None, cascade: bool = False) -> list[dict]:
    """For each threshold: share of prompts sent to the student (score >= threshold) and the quality of
    the answers served (student's agreement where routed to it, 1.0 where the teacher answers). With
    `seconds` (the teacher's and the student's cost of each answer), the share of the teacher's cost
    saved; a cascade (`cascade`) pays for every student answer, escalated or not."""
    points = []
    for t in thresholds:
        to_student = scores >= t
        quality = float(np.where(to_student, agreement, 1.0).mean())
        point = {"threshold": float(t), "student_share": float(to_student.mean()), "quality": quality}
        if seconds is not None:
            teacher, student = seconds
            spent = student.sum() + teacher[~to_student].sum() if cascade else np.where(to_student, student,
                                                                                         teacher).sum()
            point["cost_saved"] = float(1.0 - spent / teacher.sum())
        points.append(point)
    return points


def perfect_router_curve(agreement: np.ndarray, seconds: tuple[np.ndarray, np.ndarray] | None = None) -> list[dict]:
    """The curve of a router that knew each answer's agreement in advance and sends the student the
    prompts it agrees on most: at each share, the best quality any router could reach (the bound on a
    policy's share at a target quality; its cost saved is that of routing by agreement, not the least
    cost). A threshold at every distinct agreement, so no crossing of a quality target is skipped."""
    return curve(agreement, agreement, np.unique(np.concatenate([agreement, [agreement.max() + 1e-6]])), seconds)


def pick(points: list[dict], target_quality: float, target_share: float | None) -> dict:
    if target_share is not None:  # the point whose share is closest to the target
        return min(points, key=lambda p: (abs(p["student_share"] - target_share), -p["quality"]))
    ok = [p for p in points if p["quality"] >= target_quality]
    if not ok:
        return max(points, key=lambda p: p["threshold"])  # everything to the teacher
    return max(ok, key=lambda p: (p.get("cost_saved", p["student_share"]), p["student_share"], p["quality"]))


def sweep(scores: np.ndarray) -> np.ndarray:
    """Thresholds at score quantiles, plus one above the maximum (share 0)."""
    qs = np.quantile(scores, np.linspace(0, 1, SWEEP - 1))
    return np.unique(np.concatenate([qs, [scores.max() + 1e-6]]))


def calibrate(cfg: CalibrationConfig, progress=print) -> dict:
    from compress.router_features import featurizer
    from compress.router_model import LearnedRouter, fit

    started = time.time()
    prompts = prompts_of(cfg.prompts)
    if len(prompts) < 10:
        raise ValueError(f"{cfg.prompts} holds {len(prompts)} prompts; calibration needs at least 10")
    teacher = teacher_answers(cfg, prompts)
    student = answers_of(cfg, cfg.student, prompts, "student answers")
    costs = {"teacher": seconds_per_token(cfg.teacher, cfg.teacher_cost),
             "student": seconds_per_token(cfg.student, cfg.student_cost)}
    seconds = (np.array([a.tokens for a in teacher]) * costs["teacher"]["seconds_per_token"],
               np.array([a.tokens for a in student]) * costs["student"]["seconds_per_token"])
    agreement = np.array([rouge_l(s.text, t.text) for s, t in zip(student, teacher)])
    labels = (agreement >= cfg.agree_threshold).astype(np.float64)
    progress(f"student agrees with the teacher on {labels.mean():.1%} of {len(prompts)} prompts "
             f"(ROUGE-L >= {cfg.agree_threshold}); mean ROUGE-L {agreement.mean():.3f}")

    order = list(range(len(prompts)))
    random.Random(cfg.seed).shuffle(order)
    n_hold = max(5, int(len(order) * cfg.holdout_fraction))
    hold, train = np.array(order[:n_hold]), np.array(order[n_hold:])
    feats = featurizer(cfg.features)(prompts).astype(np.float64)
    weights, bias, mean, std = fit(feats[train], labels[train])
    router = LearnedRouter(cfg.features, weights, bias, mean, std, threshold=0.5)
    learned_scores = router.scores(feats[hold].astype(np.float32))
    held_seconds = (seconds[0][hold], seconds[1][hold])
    learned_curve = curve(learned_scores, agreement[hold], sweep(learned_scores), held_seconds)
    chosen = pick(learned_curve, cfg.target_quality, cfg.target_share)
    confidence = np.array([s.mean_logprob for s in student])[hold]
    cascade_curve = curve(confidence, agreement[hold], sweep(confidence), held_seconds, cascade=True)
    cascade_chosen = pick(cascade_curve, cfg.target_quality, cfg.target_share)
    oracle_curve = perfect_router_curve(agreement[hold], held_seconds)
    oracle_chosen = pick(oracle_curve, cfg.target_quality, cfg.target_share)
    train_acc = float(((router.scores(feats[train].astype(np.float32)) >= 0.5) == labels[train]).mean())

    router.threshold = chosen["threshold"]
    router.manifest = {
        "kind": "learned-router", "teacher": str(cfg.teacher), "student": str(cfg.student),
        "prompts": str(cfg.prompts), "prompts_sha256": file_hash(cfg.prompts), "num_prompts": len(prompts),
        "holdout": int(n_hold), "agreement": {"metric": "rouge_l_f1", "threshold": cfg.agree_threshold,
                                              "mean": float(agreement.mean()), "share_agreeing": float(labels.mean())},
        "train_accuracy": train_acc, "chosen": chosen, "cascade": {"metric": "mean_logprob", "chosen": cascade_chosen},
        "oracle": {"metric": "the answer's own agreement (a perfect router)", "chosen": oracle_chosen},
        "costs": costs, "curves": {"learned": learned_curve, "cascade": cascade_curve, "oracle": oracle_curve},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items() if k != "api_key"},
        "seconds": round(time.time() - started, 1),
    }
    router.save(cfg.out)
    write_answers(cfg.out / "teacher_answers.jsonl", prompts, teacher)  # reusable: --teacher-answers
    with (cfg.out / "answers.jsonl").open("w") as f:
        for p, s, t, a in zip(prompts, student, teacher, agreement):
            f.write(json.dumps({"prompt": p, "teacher": t.text, "student": s.text, "rouge_l": round(float(a), 4),
                                "student_mean_logprob": round(s.mean_logprob, 4), "teacher_tokens": t.tokens,
                                "student_tokens": s.tokens}) + "\n")
    _plot(cfg.out / "curve.png", learned_curve, cascade_curve, oracle_curve, cfg.target_quality)
    return router.manifest


def _plot(path: Path, learned: list[dict], cascade: list[dict], oracle: list[dict], target: float) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    x = "cost_saved" if "cost_saved" in learned[0] else "student_share"
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points, style in (("learned router", learned, "-"), ("cascade (mean logprob)", cascade, "-"),
                                ("perfect router (bound)", oracle, ":")):
        pts = sorted(points, key=lambda p: p[x])
        ax.plot([p[x] for p in pts], [p["quality"] for p in pts], style, marker="o", ms=3, label=name)
    ax.axhline(target, color="grey", ls="--", lw=1, label=f"{target:.0%} of teacher quality")
    ax.set_xlabel("share of the teacher's cost saved" if x == "cost_saved"
                  else "share of prompts answered by the student")
    ax.set_ylabel("quality (agreement with teacher, teacher = 1)")
    ax.set_title("Routing: cost saved vs quality (held-out prompts)" if x == "cost_saved"
                 else "Routing: student share vs quality (held-out prompts)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
