"""The `slimserve` command."""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path

from server import cli_compress
from server import env_report
from server.bench import command as bench_command
from server.errors import ConfigError
from server.model_settings import MODEL_SETTINGS, not_none


def _json_mapping(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve models over the OpenAI API",
                       description="Every flag can also be set in the YAML file and as SLIMSERVE_<NAME>.")
    p.add_argument("--config", type=Path, help="serve.yaml with any of the settings below")
    p.add_argument("--served-model-name", help="the id clients send as `model`")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    _model_flags(p)
    p.add_argument("--api-key", dest="api_keys", action="append", help="client key; repeat for several")
    p.add_argument("--cache-dir", type=Path)
    p.add_argument("--log-level")
    p.add_argument("--log-format", help="text | json (one JSON object per line, request lines with an id)")
    p.add_argument("--max-request-bytes", type=int, help="largest request body (413 above)")
    p.add_argument("--max-prompt-tokens", type=int, help="prompt tokens per choice (default: the context)")
    p.add_argument("--max-tokens-limit", type=int, help="largest max_tokens a request may ask for")
    p.add_argument("--max-n", type=int, help="largest n per request")
    p.add_argument("--max-waiting", type=int, help="requests waiting per model before 429 with Retry-After")
    p.add_argument("--strict-fields", action="store_true", default=None,
                   help="refuse unknown request fields with a 400 (default: ignore them, named in a header)")
    p.add_argument("--lora", action="append", help="NAME=PATH: a pinned adapter loaded at start; repeatable")
    p.add_argument("--adapter-root", dest="adapter_roots", action="append", type=Path,
                   help="folder whose adapters may be loaded at runtime and just in time; repeatable")
    p.add_argument("--max-loras", type=int, help="adapters resident at once (least recently used evicted)")
    p.add_argument("--max-lora-rank", type=int)
    p.add_argument("--admin-key", help="key for /v1/load_lora_adapter and /v1/unload_lora_adapter")
    p.add_argument("--shutdown-grace", type=float, help="SIGTERM: seconds in-flight requests get to finish")
    p.add_argument("--metrics-public", action="store_true", default=None,
                   help="serve /metrics without an API key (for Prometheus or an endpoint picker)")


def _model_flags(p: argparse.ArgumentParser) -> None:
    """The per-model settings (server/model_settings.py) as flags: for the single model, or every model's default."""
    for s in MODEL_SETTINGS:
        if not s.flag:
            continue
        flag, kind = "--" + s.name.replace("_", "-"), not_none(s.type)
        if kind is bool:  # a setting on by default also gets its --no-flag
            action = argparse.BooleanOptionalAction if s.default is True else "store_true"
            p.add_argument(flag, action=action, default=None, help=s.help)
            continue
        shown = s.default not in (None, False) and "default" not in s.help
        if typing.get_origin(kind) is dict or kind is dict:  # a mapping, given as JSON on the command line
            p.add_argument(flag, type=_json_mapping, help=s.help)
            continue
        p.add_argument(flag, type=kind if kind in (int, float) else str,
                       help=f"{s.help} (default: {s.default})" if shown else s.help)


def _adapters_parser(sub) -> None:
    p = sub.add_parser("adapters", help="train LoRA adapters and fine-tune models")
    asub = p.add_subparsers(dest="adapters_command", required=True)
    t = asub.add_parser("train", help="fine-tune on a JSONL or text file",
                        description="JSONL rows hold chat `messages`, `prompt`+`completion`, or `text`; a .txt file "
                                    "is plain text. Answers (assistant turns, completions) alone carry the loss.")
    t.add_argument("--base", default="smollm2-135m-instruct", help="base model folder or the embedded default")
    t.add_argument("--data", type=Path, required=True)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--mode", choices=["lora", "partial", "full"], default="lora")
    t.add_argument("--rank", "-r", type=int, default=16)
    t.add_argument("--alpha", type=float, default=32.0)
    t.add_argument("--dropout", type=float, default=0.05)
    t.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj")
    t.add_argument("--last-n-blocks", type=int, default=2, help="partial mode: train the last N decoder blocks")
    t.add_argument("--train-modules", help="partial mode: regex over parameter names to train instead")
    t.add_argument("--epochs", type=float, default=1.0)
    t.add_argument("--max-steps", type=int)
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--eval-fraction", type=float, default=0.1)
    t.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    t.add_argument("--eval-every", type=int, default=0, help="held-out loss every N steps (into eval_history)")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "slimserve")


def _adapters(args: argparse.Namespace) -> int:
    import json

    from adapters.train import TrainConfig, train
    from server.default_model import DEFAULT_MODEL_ID, default_model_dir

    base = str(default_model_dir(args.cache_dir)) if args.base == DEFAULT_MODEL_ID else args.base
    if not Path(base, "config.json").is_file():
        raise ConfigError("base", f"{args.base} is not a model folder (no config.json)")
    if not args.data.is_file():
        raise ConfigError("data", f"no such file: {args.data}")
    cfg = TrainConfig(
        base=base, data=args.data, out=args.out, mode=args.mode, rank=args.rank, alpha=args.alpha,
        dropout=args.dropout, target_modules=[m.strip() for m in args.target_modules.split(",") if m.strip()],
        last_n_blocks=args.last_n_blocks, train_modules=args.train_modules, epochs=args.epochs,
        max_steps=args.max_steps, lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
        seq_len=args.seq_len, eval_fraction=args.eval_fraction, save_every=args.save_every, seed=args.seed,
        base_name=args.base, eval_every=args.eval_every, resume=args.resume,
    )
    from compress.training import ResumeError

    try:
        report = train(cfg)
    except ResumeError as exc:
        raise ConfigError("resume", str(exc)) from None
    print(json.dumps({k: report[k] for k in ("mode", "steps", "tokens", "seconds", "held_out_loss")}, indent=2))
    print(f"wrote {args.out}")
    return 0


def _serve(args: argparse.Namespace) -> int:

    from server.app import create_app
    from server.engines.factory import build_engines
    from server.load_progress import LoadProgress
    from server.loading_server import answering_while_loading, bind
    from server.metrics import Metrics
    from server.request_log import configure_logging
    from server.settings import load_settings
    from server.shutdown import serve_until_drained

    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    settings = load_settings(args.config, **overrides)
    configure_logging(settings.log_level, settings.log_format)
    metrics = Metrics()
    progress = LoadProgress(metrics.load_progress)
    try:
        sock = bind(settings.host, settings.port)
    except OSError as exc:
        raise ConfigError("port", f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}") from None
    # /health, /ready (with each model's stage) and /metrics answer while the models convert, quantize and load;
    # a bad model still fails here, before the app starts, and the process exits 2
    public = settings.metrics_public or not settings.api_keys
    with answering_while_loading(sock, progress.snapshot, metrics.text if public else None):
        engines = build_engines(settings, progress)
    app = create_app(settings, engines, metrics=metrics)
    # uvicorn's records go through configure_logging's handler (log_config None)
    serve_until_drained(app, app.state.slim, host=settings.host, port=settings.port, log_level=settings.log_level,
                        grace=settings.shutdown_grace, log_config=None, sockets=[sock])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slimserve", description="Serve compressed LLMs over the OpenAI API.")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _adapters_parser(sub)
    cli_compress.add_parser(sub)
    bench_command.add_parser(sub)
    env_report.add_parser(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "adapters":
            return _adapters(args)
        if args.command == "compress":
            return cli_compress.run(args)
        if args.command == "bench":
            return bench_command.run(args)
        if args.command == "env":
            return env_report.run(args)
    except ConfigError as exc:
        print(f"slimserve: {exc}", file=sys.stderr)
        return 2
    return 1
