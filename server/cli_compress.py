"""`slimserve compress ...`: the offline tools (quantize, eval)."""

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
    q.add_argument("--method", default="gptq", help="gptq | awq | rtn | int8")
    q.add_argument("--backend", default="gptqmodel", help="gptqmodel | llmcompressor")
    q.add_argument("--bits", type=int, default=4)
    q.add_argument("--group-size", type=int, default=128, help="input columns per scale; -1: one per row")
    q.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing activation")
    q.add_argument("--sym", dest="sym", action="store_true", default=True)
    q.add_argument("--asym", dest="sym", action="store_false")
    q.add_argument("--calib", type=Path, help="calibration text (.txt or .jsonl); gptq and awq need it")
    q.add_argument("--num-samples", type=int, default=128)
    q.add_argument("--seq-len", type=int, default=512)
    q.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "slimserve")
    pr = csub.add_parser("prune", help="drop the least important decoder blocks (block influence)")
    pr.add_argument("model")
    pr.add_argument("out", type=Path)
    how = pr.add_mutually_exclusive_group(required=True)
    how.add_argument("--drop-layers", type=int)
    how.add_argument("--keep-ratio", type=float)
    pr.add_argument("--calib", type=Path, required=True)
    pr.add_argument("--num-samples", type=int, default=32)
    pr.add_argument("--seq-len", type=int, default=256)
    pr.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "slimserve")
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


def run(args: argparse.Namespace) -> int:
    if args.compress_command == "quantize":
        from compress.quantize import QuantizeError, QuantizeSpec, quantize

        spec = QuantizeSpec(model=Path(_model_dir(args.model, args.cache_dir)), out=args.out, method=args.method,
                            backend=args.backend, bits=args.bits, group_size=args.group_size,
                            act_order=args.act_order, sym=args.sym, calib=args.calib, num_samples=args.num_samples,
                            seq_len=args.seq_len)
        try:
            report = quantize(spec)
        except QuantizeError as exc:
            raise ConfigError("quantize", str(exc)) from None
        print(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
        return 0
    if args.compress_command == "prune":
        from compress.data import DataError
        from compress.prune import prune

        if not args.calib.is_file():
            raise ConfigError("calib", f"no such file: {args.calib}")
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
