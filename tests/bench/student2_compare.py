"""Issue #20 item 2: today's router student against the span + heal + T=1 student, at one CPU budget.

    python -m tests.bench.student2_compare R --today tests/bench/figures/router_today_smollm2.json \
        --span tests/bench/figures/router_span_smollm2.json

R is the folder of tests/bench/router_student2.sh (cpu_today.txt, cpu_span.txt, the student folders);
the two JSONs are tests/bench/router_curve.py runs on each student. Writes one JSON (both recipes'
CPU seconds, their manifests' figures, held-out agreement and the best points of both routing curves)
and a PNG with both students' curves, with the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from compress.manifest import read_manifest
from tests.bench.machine import describe, summary
from tests.bench.output import pyplot, save_figure

FIGURES = Path(__file__).parent / "figures"


def cpu_seconds(path: Path) -> dict:
    """`NAME user sys wall` lines (GNU time) -> per step and total CPU (user + sys) and wall seconds. Steps
named `shared-*` (the teacher's top-k cache: built once per data set and reused by every student, like
the teacher's answers) are totalled apart, in `shared_cpu_s`."""
    steps = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 4:
            name, user, sys_, wall = parts
            steps[name] = {"cpu_s": round(float(user) + float(sys_), 1), "wall_s": round(float(wall), 1)}
    own = {k: v for k, v in steps.items() if not k.startswith("shared-")}
    return {"steps": steps, "cpu_s": round(sum(s["cpu_s"] for s in own.values()), 1),
            "wall_s": round(sum(s["wall_s"] for s in own.values()), 1),
            "shared_cpu_s": round(sum(s["cpu_s"] for k, s in steps.items() if k.startswith("shared-")), 1)}


def summarise(curve: dict, quality: float = 0.95) -> dict:
    held = curve["heldout"]
    return {"agreement": curve["agreement"], "costs": curve["costs"],
            f"max_student_share_at_quality_{quality}": held[f"max_student_share_at_quality_{quality}"],
            f"max_cost_saved_at_quality_{quality}": held.get(f"max_cost_saved_at_quality_{quality}"),
            "command": curve["command"]}


def paired(today_work: Path, span_work: Path, threshold: float = 0.5, seed: int = 0) -> dict:
    """Per-prompt ROUGE-L of both students on the same held-out prompts (router_curve --work folders):
    the mean difference with a 95% bootstrap interval, and the prompts only one of them agrees on."""
    import random

    from compress.router_calibration import rouge_l

    def texts(path: Path) -> list[str]:
        return [json.loads(line)["messages"][1]["content"] for line in path.read_text().splitlines()]

    ref = texts(today_work / "heldout_teacher_answers.jsonl")
    a = [rouge_l(x, r) for x, r in zip(texts(today_work / "heldout_student_answers.jsonl"), ref)]
    b = [rouge_l(x, r) for x, r in zip(texts(span_work / "heldout_student_answers.jsonl"), ref)]
    d = [y - x for x, y in zip(a, b)]
    rng = random.Random(seed)
    boot = sorted(sum(d[rng.randrange(len(d))] for _ in d) / len(d) for _ in range(2000))
    return {"prompts": len(d), "mean_rouge_l_span_minus_today": round(sum(d) / len(d), 4),
            "bootstrap_95": [round(boot[50], 4), round(boot[1949], 4)],
            "agree_only_span": sum(y >= threshold > x for x, y in zip(a, b)),
            "agree_only_today": sum(x >= threshold > y for x, y in zip(a, b))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("--today", type=Path, required=True)
    ap.add_argument("--span", type=Path, required=True)
    ap.add_argument("--healed", type=Path, help="router_curve JSON of the span student before KD (span-healed)")
    ap.add_argument("--paired", type=Path, nargs=2, metavar=("TODAY_WORK", "SPAN_WORK"),
                    help="the two router_curve --work folders: per-prompt comparison on the same held-out prompts")
    ap.add_argument("--out", type=Path, default=FIGURES / "router_student2_smollm2.json")
    args = ap.parse_args(argv)
    R = args.folder
    curves = {"today": json.loads(args.today.read_text()), "span": json.loads(args.span.read_text())}
    pruned = {"today": read_manifest(R / "today-pruned") or {}, "span": read_manifest(R / "span-healed") or {}}
    kd = {"today": read_manifest(R / "today-kd") or {}, "span": read_manifest(R / "span-kd") or {}}
    recipes = {}
    for name in ("today", "span"):
        recipes[name] = {
            "cpu": cpu_seconds(R / f"cpu_{name}.txt"),
            "blocks": pruned[name].get("blocks_after"),
            "dropped": [d["block"] for d in pruned[name].get("dropped", [])],
            "span": pruned[name].get("span"), "heal": pruned[name].get("heal"),
            "kd": {k: kd[name].get(k) for k in ("steps", "tokens", "seconds", "loss_settings", "teacher_source",
                                                 "held_out_kl_to_teacher", "held_out_loss")},
            **summarise(curves[name]),
        }
    if args.healed:  # the span recipe stopped after healing: its prune-heal step alone
        steps = cpu_seconds(R / "cpu_span.txt")["steps"]
        own = {k: v for k, v in steps.items() if k == "prune-heal"}
        recipes["healed_no_kd"] = {"cpu": {"steps": own, "cpu_s": sum(v["cpu_s"] for v in own.values())},
                                   "blocks": pruned["span"].get("blocks_after"),
                                   **summarise(json.loads(args.healed.read_text()))}
    machine = describe()
    result = {"command": "python -m tests.bench.student2_compare " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": machine,
              "teacher": "SmolLM2-135M-Instruct (bf16 weights expanded from a Q4_1 GGUF), 30 blocks",
              "recipes": recipes}
    if args.paired:
        result["paired_heldout"] = paired(*args.paired)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    _plot(args.out.with_suffix(".png"), curves, recipes, f"{summary(machine)}\n{result['command']}")
    print(json.dumps({n: {k: r[k] for k in ("cpu", "blocks", "agreement")} for n, r in recipes.items()}, indent=2))
    print(json.dumps(result.get("paired_heldout"), indent=2))
    print(f"wrote {args.out}")
    return 0


def _plot(path: Path, curves: dict, recipes: dict, footer: str) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 5))
    labels = {"today": "today: drop 6 by influence, KD T=2", "span": "span 7 -> 1 healed block, KD T=1"}
    for name, color in (("today", "tab:blue"), ("span", "tab:red")):
        cpu = recipes[name]["cpu"]["cpu_s"]
        for policy, style in (("learned", "-"), ("cascade", "--")):
            pts = sorted(curves[name]["heldout"]["curves"][policy], key=lambda p: p["cost_saved"])
            ax.plot([p["cost_saved"] for p in pts], [p["quality"] for p in pts], style, marker="o", ms=2,
                    color=color, label=f"{labels[name]} ({cpu:.0f} CPU-s): {policy}")
    ax.axhline(0.95, color="grey", ls=":", lw=1, label="95% of teacher quality")
    ax.axvline(0.30, color="grey", ls="-.", lw=1, label="30% of teacher cost saved")
    ax.set_xlabel("share of the teacher's cost saved (seconds per output token x tokens)")
    ax.set_ylabel("quality: mean ROUGE-L vs the teacher (teacher = 1)")
    ax.set_title("Router students on SmolLM2-135M-Instruct at one CPU budget", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path, footer, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
