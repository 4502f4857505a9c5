"""`slimserve compress recipe recipe.yaml`: prune -> distill -> quantize -> eval, in order, resumable.

A recipe names a starting model, a work folder and a list of stages; each stage's input is the
previous stage's artifact (the starting model for the first) and its output is a folder
`WORKDIR/NN-kind` with its own slimserve.json. `workdir/recipe-state.json` records each finished
stage's fingerprint (its settings and its input's); a rerun skips finished stages, redoes a stage
whose settings changed and every stage after it, and lets an interrupted distill stage continue
from its last checkpoint. An `eval` stage compares the starting model with every artifact made so
far (plus any `variants:` it lists) and draws their size-vs-quality frontier.

    model: smollm2-135m-instruct
    workdir: ./smol-recipe
    stages:
      - prune: {drop_layers: 2, calib: genesis.txt}
      - distill: {data: passages.txt, max_steps: 200}
      - quantize: {method: gptq, bits: 4, group_size: 64, calib: genesis.txt, avg_bits: 4.5}
      - distill: {data: passages.txt, max_steps: 60, lr: 5.0e-5}   # recovery: the student is quantized
      - eval: {text: john.txt}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

from compress.manifest import read_manifest

KINDS = ("prune", "distill", "quantize", "eval")
STATE = "recipe-state.json"
PRUNE_KEYS = {"drop_layers", "keep_ratio", "calib", "num_samples", "seq_len"}
EVAL_KEYS = {"text", "seq_len", "max_tokens", "variants"}
MIXED_KEYS = {"avg_bits", "keep_8bit", "sensitivity"}
PATH_KEYS = {"calib", "data", "text", "teacher", "sensitivity", "teacher_cache", "cache_teacher"}


class RecipeError(ValueError):
    pass


def _fields(cls, drop: set[str]) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} - drop


def allowed_keys(kind: str) -> set[str]:
    from compress.distill import DistillConfig
    from compress.quantize import QuantizeSpec

    if kind == "prune":
        return PRUNE_KEYS
    if kind == "distill":
        return _fields(DistillConfig, {"student", "out", "resume"})
    if kind == "quantize":
        return _fields(QuantizeSpec, {"model", "out"}) | MIXED_KEYS
    return EVAL_KEYS


def load_recipe(path: Path) -> dict:
    """Read and check a recipe; paths in it are relative to the recipe file."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc}") from None
    if not isinstance(raw, dict) or "model" not in raw or not isinstance(raw.get("stages"), list) or not raw["stages"]:
        raise RecipeError(f"{path}: a recipe needs `model:` and a non-empty `stages:` list")
    unknown = set(raw) - {"model", "workdir", "stages"}
    if unknown:
        raise RecipeError(f"{path}: unknown top-level key {sorted(unknown)[0]!r} (model, workdir, stages)")
    base = Path(path).resolve().parent
    stages = []
    for n, entry in enumerate(raw["stages"], 1):
        if not isinstance(entry, dict) or len(entry) != 1 or next(iter(entry)) not in KINDS:
            raise RecipeError(f"{path}: stage {n} must be one of {', '.join(KINDS)} with its settings, "
                              f"e.g. `- quantize: {{method: gptq}}`")
        kind, params = next(iter(entry.items()))
        params = dict(params or {})
        bad = set(params) - allowed_keys(kind)
        if bad:
            raise RecipeError(f"{path}: stage {n} ({kind}): unknown setting {sorted(bad)[0]!r}; "
                              f"known: {', '.join(sorted(allowed_keys(kind)))}")
        for key in PATH_KEYS & set(params):
            if params[key] not in (None, "self"):
                params[key] = str((base / params[key]).resolve()) if not Path(params[key]).is_absolute() else params[key]
        if kind == "eval":
            if "text" not in params:
                raise RecipeError(f"{path}: stage {n} (eval) needs `text:` (held-out text)")
            params["variants"] = [str((base / v).resolve()) if "/" in v else v for v in params.get("variants", [])]
        stages.append((kind, params))
    return {"model": raw["model"], "workdir": (base / raw.get("workdir", "recipe-out")).resolve(), "stages": stages}


def _fingerprint(kind: str, params: dict, previous: str) -> str:
    blob = json.dumps({"kind": kind, "params": params, "input": previous}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run(recipe: dict, model_dir: Path, progress: bool = True, say=print) -> list[dict]:
    """Run (or resume) every stage; returns one summary per stage."""
    workdir: Path = recipe["workdir"]
    workdir.mkdir(parents=True, exist_ok=True)
    state_path = workdir / STATE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    current, fingerprint = Path(model_dir), str(model_dir)
    made: list[Path] = []
    summaries = []
    stale = False
    for n, (kind, params) in enumerate(recipe["stages"], 1):
        out = workdir / f"{n:02d}-{kind}"
        fingerprint = _fingerprint(kind, params, fingerprint)
        finished = state.get(out.name) == fingerprint and read_manifest(out) is not None
        if finished and not stale:
            say(f"stage {n}/{len(recipe['stages'])} {kind}: done earlier, kept ({out})")
        else:
            stale = True  # everything after a redone stage is redone too
            if state.get(out.name) != fingerprint or kind != "distill":
                shutil.rmtree(out, ignore_errors=True)  # a distill of the same settings resumes from its checkpoints
            state.pop(out.name, None)
            say(f"stage {n}/{len(recipe['stages'])} {kind}: running -> {out}")
            _run_stage(kind, params, current, Path(model_dir), out, made, progress)
            state[out.name] = fingerprint
            state_path.write_text(json.dumps(state, indent=2))
        manifest = read_manifest(out) or {}
        summaries.append({"stage": n, "kind": kind, "folder": str(out), "manifest_kind": manifest.get("kind")})
        if kind != "eval":
            current = out
            made.append(out)
    return summaries


def _run_stage(kind: str, params: dict, current: Path, reference: Path, out: Path, made: list[Path],
               progress: bool) -> None:
    if kind == "prune":
        from compress.prune import prune

        prune(current, out, calib=Path(params["calib"]), drop=params.get("drop_layers"),
              keep_ratio=params.get("keep_ratio"), num_samples=params.get("num_samples", 32),
              seq_len=params.get("seq_len", 256))
    elif kind == "distill":
        from compress.distill import DistillConfig, distill

        settings = {k: (Path(v) if k in PATH_KEYS and v is not None else v) for k, v in params.items()}
        settings.setdefault("teacher", reference)
        resume = (out / "checkpoints").is_dir()
        distill(DistillConfig(student=current, out=out, resume=resume, **settings), progress=progress)
    elif kind == "quantize":
        from compress.mixed_precision import quantize_with_budget
        from compress.quantize import QuantizeSpec, quantize

        budget = {k: params[k] for k in MIXED_KEYS if k in params}
        settings = {k: v for k, v in params.items() if k not in MIXED_KEYS}
        if settings.get("calib") not in (None, "self"):
            settings["calib"] = Path(settings["calib"])
        spec = QuantizeSpec(model=current, out=out, **settings)
        if budget:
            quantize_with_budget(spec, **budget, scan_progress=progress)
        else:
            quantize(spec)
    else:
        from compress.evaluate import evaluate

        variants = [str(p) for p in made] + list(params.get("variants", []))
        if not variants:
            raise RecipeError("an eval stage needs an artifact before it, or `variants:`")
        evaluate(str(reference), variants, Path(params["text"]), out, seq_len=params.get("seq_len", 256),
                 max_tokens=params.get("max_tokens", 8192), progress=progress)
        from compress.manifest import write_manifest

        write_manifest(out, "evaluation", reference=str(reference), variants=variants, text=params["text"])
