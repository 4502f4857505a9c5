"""`slimserve compress ...`: the offline tools (quantize, prune, distill, eval)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from server.errors import ConfigError


def _model_dir(name: str, cache_dir: Path) -> str:
    """The embedded default by its id, a folder, or `folder@method` for load-time quantization."""
    from server.default_model import DEFAULT_MODEL_ID, default_model_dir

    folder, at, method = name.partition("@")
    if folder == DEFAULT_MODEL_ID:
        folder = str(default_model_dir(cache_dir))
    if not Path(folder, "config.json").is_file():
        raise ConfigError("model", f"{folder} is not a model folder (no config.json)")
    return folder + at + method


def add_parser(sub) -> None:
    p = sub.add_parser("compress", help="offline tools: quantize, eval")
    csub = p.add_subparsers(dest="compress_command", required=True)
    q = csub.add_parser("quantize", help="GPTQ / AWQ / RTN / int8 artifacts (GPTQModel)",
                        description="Writes a model folder that both engines load, with slimserve.json.")
    q.add_argument("model")
    q.add_argument("out", type=Path)
    q.add_argument("--method", default="gptq", help="gptq | awq | rtn | int8 | autoround")
    q.add_argument("--backend", default="gptqmodel", help="gptqmodel | llmcompressor")
    q.add_argument("--bits", type=int, default=4)
    q.add_argument("--group-size", type=int, default=128, help="input columns per scale; -1: one per row")
    q.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing activation")
    q.add_argument("--sym", dest="sym", action="store_true", default=True)
    q.add_argument("--asym", dest="sym", action="store_false")
    q.add_argument("--calib", help="calibration text (.txt or .jsonl), or `self` (the model writes its own from "
                                   "fixed seeded prompts); gptq and awq need it")
    q.add_argument("--num-samples", type=int, default=128)
    q.add_argument("--seq-len", type=int, default=512)
    q.add_argument("--mse", type=float, nargs="?", const=2.4, default=0.0, metavar="NORM",
                   help="GPTQ: search each group's clipping range for the least sum |w - q|^NORM (default 2.4)")
    q.add_argument("--module-bits", action="append", default=[], metavar="NAME=BITS",
                   help="bits for one linear layer, e.g. model.layers.0.mlp.down_proj=8 (repeatable)")
    q.add_argument("--iters", type=int, default=50, help="autoround: SignRound steps per decoder block")
    q.add_argument("--awq-clip", action="store_true", help="AWQ: fit clipping ranges (GPTQModel's way; off: it "
                                                           "cost SmolLM2 more than it gained)")
    q.add_argument("--awq-no-clip", dest="awq_clip", action="store_false", help=argparse.SUPPRESS)  # the default
    q.add_argument("--awq-no-scale-one", dest="awq_scale_one", action="store_false",
                   help="AWQ: GPTQModel's scale search as it is (never tries unscaled weights)")
    budget = q.add_mutually_exclusive_group()
    budget.add_argument("--avg-bits", type=float, metavar="B", help="mixed precision: 8-bit layers where the "
                        "sensitivity scan says they pay, average stored bits per weight <= B (e.g. 4.6)")
    budget.add_argument("--keep-8bit", type=int, metavar="N", help="mixed precision: the N most sensitive layers at 8 bits")
    q.add_argument("--sensitivity", type=Path, metavar="SCAN", help="a saved `compress sensitivity` scan for "
                   "--avg-bits/--keep-8bit (else scanned on --calib)")
    q.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "slimserve")
    w = csub.add_parser("warm", help="quantize every model a serve.yaml quantizes at load into the cache, then exit",
                        description="For a Kubernetes Job or initContainer: the serving pods then start from the "
                                    "shared cache in seconds.")
    w.add_argument("--config", type=Path, required=True, help="the serve.yaml the servers will use")
    w.add_argument("--cache-dir", type=Path, help="overrides the config's cache_dir")
    c = csub.add_parser("cache", help="list or remove quantized models in the cache")
    c.add_argument("action", choices=("ls", "rm"))
    c.add_argument("names", nargs="*", help="rm: entry names as `ls` prints them")
    c.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "slimserve")
    c.add_argument("--json", action="store_true")
    pr = csub.add_parser("prune", help="drop the least important decoder blocks (block influence)")
    pr.add_argument("model")
    pr.add_argument("out", type=Path)
    how = pr.add_mutually_exclusive_group(required=True)
    how.add_argument("--drop-layers", type=int)
    how.add_argument("--keep-ratio", type=float)
    how.add_argument("--contiguous", type=int, metavar="N",
                     help="drop the contiguous span of N blocks whose input and output differ least (angular distance)")
    pr.add_argument("--heal-steps", type=int, default=0,
                    help="with --contiguous: replace the span by one block fitted S steps to the span's "
                         "input -> output on the calibration data (keeps N-1 fewer blocks, not N)")
    pr.add_argument("--heal-init", choices=("first", "last"), default="last", help="the span block the fit starts from")
    pr.add_argument("--heal-lr", type=float, default=1e-4)
    pr.add_argument("--heal-samples", type=int, default=256, help="calibration examples cached for healing")
    pr.add_argument("--calib", type=Path, required=True)
    pr.add_argument("--num-samples", type=int, default=32)
    pr.add_argument("--seq-len", type=int, default=256)
    pr.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "slimserve")
    d = csub.add_parser("distill", help="train a student on a teacher (logit KD, or sequence KD with --generate)")
    d.add_argument("out", type=Path)
    d.add_argument("--teacher", help="teacher model folder; with --teacher-cache unused (the cache names its teacher)")
    d.add_argument("--student", required=True, help="student model folder (e.g. a pruned teacher)")
    d.add_argument("--data", type=Path, required=True, help="training text/JSONL; with --generate: the prompts")
    d.add_argument("--generate", action="store_true", help="sequence-level KD: the teacher answers --data first")
    d.add_argument("--max-new-tokens", type=int, default=128)
    d.add_argument("--loss", default="forward_kl", help="forward_kl | reverse_kl | jsd | ce")
    d.add_argument("--alpha", type=float, default=1.0, help="weight of the KD term against cross-entropy")
    d.add_argument("--temperature", type=float, default=2.0)
    d.add_argument("--beta", type=float, default=0.5, help="jsd mixture weight")
    d.add_argument("--max-steps", type=int, default=100)
    d.add_argument("--lr", type=float, default=5e-5)
    d.add_argument("--batch-size", type=int, default=8)
    d.add_argument("--grad-accum", type=int, default=1)
    d.add_argument("--seq-len", type=int, default=256)
    d.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps under OUT/checkpoints")
    d.add_argument("--eval-every", type=int, default=0,
                   help="held-out loss and KL to the teacher every N steps (manifest eval_history, progress bar)")
    d.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT")
    cache = d.add_mutually_exclusive_group()
    cache.add_argument("--cache-teacher", type=Path, metavar="DIR",
                       help="run the teacher once over --data, store its top-k log-probs in DIR, train from them")
    cache.add_argument("--teacher-cache", type=Path, metavar="DIR",
                       help="train from a cache built by --cache-teacher; the teacher is not loaded")
    d.add_argument("--top-k", type=int, default=32, help="tokens per position kept by --cache-teacher")
    d.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "slimserve")
    e = csub.add_parser("eval", help="compare variants of a model: perplexity, KL, size, speed",
                        description="A variant is a model folder, or REF@int8 / REF@nf4 / REF@int4 for load-time "
                                    "quantization. Writes eval.json, eval.md and eval.png to --out.")
    e.add_argument("ref")
    e.add_argument("variants", nargs="+")
    e.add_argument("--text", type=Path, required=True, help="held-out plain text")
    e.add_argument("--out", type=Path, default=Path("eval"))
    e.add_argument("--seq-len", type=int, default=256)
    e.add_argument("--max-tokens", type=int, default=8192)
    e.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "slimserve")
    from server import cli_compress_recipe, cli_cost, cli_router

    cli_router.add_parser(csub)
    cli_cost.add_parser(csub)
    cli_compress_recipe.add_parsers(csub, Path.home() / ".cache" / "slimserve")


def _module_bits(pairs: list[str]) -> dict[str, int] | None:
    out = {}
    for pair in pairs:
        name, _, bits = pair.rpartition("=")
        if not name or not bits.isdigit():
            raise ConfigError("module-bits", f"expected NAME=BITS (e.g. model.layers.0.mlp.down_proj=8), not {pair!r}")
        out[name] = int(bits)
    return out or None


def run(args: argparse.Namespace) -> int:
    if args.compress_command in ("sensitivity", "recipe"):
        from server import cli_compress_recipe

        return cli_compress_recipe.run(args, _model_dir)
    if args.compress_command == "calibrate-router":
        from server import cli_router

        return cli_router.run(args)
    if args.compress_command == "cost":
        from server import cli_cost

        return cli_cost.run(args)
    if args.compress_command == "warm":
        from server.warm_cache import warm

        return warm(args.config, args.cache_dir)
    if args.compress_command == "cache":
        from server.warm_cache import cache_command

        return cache_command(args.action, args.names, args.cache_dir, as_json=args.json)
    if args.compress_command == "quantize":
        from compress.quantize import QuantizeError, QuantizeSpec, quantize

        spec = QuantizeSpec(model=Path(_model_dir(args.model, args.cache_dir)), out=args.out, method=args.method,
                            backend=args.backend, bits=args.bits, group_size=args.group_size,
                            act_order=args.act_order, sym=args.sym,
                            calib=args.calib if args.calib in (None, "self") else Path(args.calib),
                            num_samples=args.num_samples, seq_len=args.seq_len, mse=args.mse,
                            module_bits=_module_bits(args.module_bits), iters=args.iters,
                            awq_clip=args.awq_clip, awq_scale_one=args.awq_scale_one)
        from server.load_progress import LoadProgress

        shown = LoadProgress()  # a bar per stage on a terminal, a log line per stage otherwise
        def progress(stage, done, total):
            shown.stage(args.out.name, stage, done, total)

        from compress.bit_budget import BudgetError
        from compress.mixed_precision import MixedPrecisionError, quantize_with_budget

        try:
            if args.avg_bits is not None or args.keep_8bit is not None:
                if spec.module_bits:
                    raise QuantizeError("give --module-bits or a budget (--avg-bits/--keep-8bit), not both")
                report = quantize_with_budget(spec, avg_bits=args.avg_bits, keep_8bit=args.keep_8bit,
                                              sensitivity=args.sensitivity, progress=progress)
            else:
                report = quantize(spec, progress)
        except (QuantizeError, BudgetError, MixedPrecisionError) as exc:
            raise ConfigError("quantize", str(exc)) from None
        print(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
        return 0
    if args.compress_command == "prune":
        from compress.data import DataError
        from compress.prune import prune

        if not args.calib.is_file():
            raise ConfigError("calib", f"no such file: {args.calib}")
        if args.heal_steps and args.contiguous is None:
            raise ConfigError("heal-steps", "--heal-steps needs --contiguous N (the span it replaces)")
        if args.contiguous is not None:
            return _prune_span(args)
        try:
            report = prune(Path(_model_dir(args.model, args.cache_dir)), args.out, calib=args.calib,
                           drop=args.drop_layers, keep_ratio=args.keep_ratio, num_samples=args.num_samples,
                           seq_len=args.seq_len)
        except (ValueError, DataError) as exc:
            raise ConfigError("prune", str(exc)) from None
        print("block influence, least important first:")
        for row in report["ranking"]:
            mark = "  dropped" if row in report["dropped"] else ""
            print(f"  block {row['block']:>3}: {row['influence']:.5f}{mark}")
        print(f"wrote {args.out} ({report['blocks_after']} of {report['blocks_before']} blocks)")
        return 0
    if args.compress_command == "distill":
        return _distill(args)
    if args.compress_command == "eval":
        from compress.evaluate import evaluate

        if not args.text.is_file():
            raise ConfigError("text", f"no such file: {args.text}")
        ref = _model_dir(args.ref, args.cache_dir)
        variants = [_model_dir(v.replace(args.ref + "@", ref + "@") if v.startswith(args.ref + "@") else v,
                               args.cache_dir) for v in args.variants]
        reports = evaluate(ref, variants, args.text, args.out, seq_len=args.seq_len, max_tokens=args.max_tokens)
        print((args.out / "eval.md").read_text())
        print(f"wrote {args.out}/eval.json, eval.md, eval.png")
        return 0 if reports else 1
    raise ConfigError("compress", f"unknown command {args.compress_command}")


def _distill(args: argparse.Namespace) -> int:
    from compress.distill import DistillConfig, DistillError, distill, generate_dataset
    from compress.teacher_cache import TeacherCacheError
    from compress.training import ResumeError

    if args.teacher is None and args.teacher_cache is None:
        raise ConfigError("teacher", "give --teacher, or --teacher-cache DIR built earlier with --cache-teacher")
    if args.generate and (args.teacher_cache or args.cache_teacher):
        raise ConfigError("generate", "--generate trains on the teacher's answers with cross-entropy; it uses no "
                                      "logit cache (drop --cache-teacher / --teacher-cache)")
    if args.top_k < 1:
        raise ConfigError("top-k", "must be at least 1")
    teacher = Path(_model_dir(args.teacher, args.cache_dir)) if args.teacher else None
    student = Path(_model_dir(args.student, args.cache_dir))
    if not args.data.is_file():
        raise ConfigError("data", f"no such file: {args.data}")
    data, loss = args.data, args.loss
    if args.generate:  # sequence-level KD: train with cross-entropy on the teacher's own answers
        args.out.mkdir(parents=True, exist_ok=True)
        data = generate_dataset(teacher, args.data, args.out / "teacher_answers.jsonl", args.max_new_tokens)
        loss = "ce"
    cfg = DistillConfig(teacher=teacher, student=student, out=args.out, data=data, loss=loss, alpha=args.alpha,
                        temperature=args.temperature, beta=args.beta, max_steps=args.max_steps, lr=args.lr,
                        batch_size=args.batch_size, grad_accum=args.grad_accum, seq_len=args.seq_len,
                        save_every=args.save_every, eval_every=args.eval_every, resume=args.resume,
                        cache_teacher=args.cache_teacher, teacher_cache=args.teacher_cache, top_k=args.top_k)
    try:
        report = distill(cfg)
    except TeacherCacheError as exc:
        raise ConfigError("teacher-cache", str(exc)) from None
    except ResumeError as exc:
        raise ConfigError("resume", str(exc)) from None
    except DistillError as exc:
        raise ConfigError("student", str(exc)) from None
    keys = ("method", "teacher_source", "steps", "tokens", "seconds", "resumed_from_step", "held_out_kl_to_teacher",
            "held_out_loss")
    shown = report.get("recovery", report)  # a recovered quantized model nests the training report
    print(json.dumps({k: shown[k] for k in keys if k in shown}, indent=2))
    print(f"wrote {cfg.out}")
    return 0


def _prune_span(args) -> int:
    from compress.data import DataError
    from compress.prune_span import prune_span

    try:
        report = prune_span(Path(_model_dir(args.model, args.cache_dir)), args.out, calib=args.calib,
                            length=args.contiguous, heal_steps=args.heal_steps, heal_init=args.heal_init,
                            heal_lr=args.heal_lr, heal_samples=args.heal_samples, num_samples=args.num_samples,
                            seq_len=args.seq_len)
    except (ValueError, DataError) as exc:
        raise ConfigError("prune", str(exc)) from None
    span = report["span"]
    print("span angular distance by start block (span of {}):".format(span["length"]))
    for row in report["span_distances"]:
        mark = "  dropped" if row["start"] == span["start"] else ""
        print(f"  start {row['start']:>3}: {row['angular_distance']:.5f}{mark}")
    if "heal" in report:
        h = report["heal"]
        mse = h["held_out_mse"]
        print(f"healed: block {h['init_from_block']} fitted {h['steps']} steps in {h['seconds']} s; held-out MSE "
              f"identity {mse['identity']:.4g}, unfitted {mse['init_block']:.4g}, fitted {mse['healed']:.4g}")
    print(f"wrote {args.out} ({report['blocks_after']} of {report['blocks_before']} blocks)")
    return 0
