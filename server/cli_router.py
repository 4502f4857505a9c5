"""`slimserve compress calibrate-router`: train the learned router from a teacher and a student."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from server.errors import ConfigError


def add_parser(csub) -> None:
    c = csub.add_parser("calibrate-router", help="learn when the student's answer is good enough (learned policy)",
                        description="Both models answer the prompts; a classifier over prompt features learns "
                                    "where the student agrees with the teacher; the threshold is chosen on held-out "
                                    "prompts for --target-quality (default) or --target-share.")
    c.add_argument("out", type=Path, help="folder for router.json, answers.jsonl and curve.png")
    c.add_argument("--teacher", required=True, help="model folder or the embedded default (with --server: a "
                   "model name there)")
    c.add_argument("--student", required=True, help="model folder (with --server: a model name there)")
    c.add_argument("--server", help="OpenAI-compatible base URL (e.g. http://127.0.0.1:8000/v1) serving teacher and "
                   "student: both answer as served (variants quantized at load on the server's own kernels); "
                   "then both costs must be given")
    c.add_argument("--api-key-env", help="environment variable holding the server's API key")
    c.add_argument("--prompts", type=Path, required=True, help="JSONL with `prompt` (or chat `messages`) rows")
    c.add_argument("--teacher-answers", type=Path, help="chat JSONL the teacher already answered (reused, not redone)")
    c.add_argument("--features", choices=["minilm", "cheap"], default="minilm")
    c.add_argument("--max-tokens", type=int, default=48)
    c.add_argument("--batch-size", type=int, default=8, help="prompts answered together (with --server: requests "
                   "in flight)")
    c.add_argument("--agree-threshold", type=float, default=0.5, help="ROUGE-L F1 at which answers agree")
    c.add_argument("--target-quality", type=float, default=0.95)
    c.add_argument("--target-share", type=float, help="pick the threshold for this student share instead")
    c.add_argument("--teacher-cost", type=float, help="teacher's seconds per output token (default: its manifest's "
                   "`cost`, else measured now)")
    c.add_argument("--student-cost", type=float, help="student's seconds per output token (as --teacher-cost)")
    c.add_argument("--holdout-fraction", type=float, default=0.3)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "slimserve")


def run(args: argparse.Namespace) -> int:
    from compress.router_calibration import CalibrationConfig, calibrate
    from compress.served_answers import ServedAnswerError, api_key_from
    from server.engines.factory import resolve_model

    if args.server:  # model names on that server
        teacher, student = args.teacher, args.student
        try:
            api_key = api_key_from(args.api_key_env)
        except ServedAnswerError as exc:
            raise ConfigError("api_key_env", str(exc)) from exc
    else:
        teacher = Path(resolve_model(args.teacher, args.cache_dir, "teacher"))
        student = Path(resolve_model(args.student, args.cache_dir, "student"))
        api_key = None
        for name, path in (("teacher", teacher), ("student", student)):
            if not (path / "config.json").is_file():
                raise ConfigError(name, f"{path} is not a model folder")
    if not args.prompts.is_file():
        raise ConfigError("prompts", f"no such file: {args.prompts}")
    try:  # a server needs both costs given (CalibrationConfig checks)
        cfg = CalibrationConfig(teacher=teacher, student=student, prompts=args.prompts, out=args.out,
                                features=args.features, max_tokens=args.max_tokens, batch_size=args.batch_size,
                                agree_threshold=args.agree_threshold, target_quality=args.target_quality,
                                target_share=args.target_share, holdout_fraction=args.holdout_fraction,
                                seed=args.seed, teacher_answers=args.teacher_answers, teacher_cost=args.teacher_cost,
                                student_cost=args.student_cost, server=args.server, api_key=api_key)
    except ValueError as exc:
        raise ConfigError("server", str(exc)) from exc
    try:
        report = calibrate(cfg)
    except ServedAnswerError as exc:
        raise ConfigError("server", str(exc)) from exc
    except ValueError as exc:
        raise ConfigError("prompts", str(exc)) from exc
    print(json.dumps({"chosen": report["chosen"], "cascade": report["cascade"], "agreement": report["agreement"],
                      "train_accuracy": report["train_accuracy"],
                      "seconds_per_token": {k: v["seconds_per_token"] for k, v in report["costs"].items()}}, indent=2))
    for name, point in (("learned", report["chosen"]), ("cascade", report["cascade"]["chosen"]),
                        ("a perfect router", report["oracle"]["chosen"])):
        print(f"{name}: threshold {point['threshold']:.4g} sends {point['student_share']:.1%} of held-out prompts to "
              f"the student at quality {point['quality']:.3f} and saves {point['cost_saved']:.1%} of the teacher's "
              "cost")
    print(f"wrote {args.out}")
    return 0
