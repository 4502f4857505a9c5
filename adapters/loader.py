"""Reading a PEFT LoRA adapter folder safely, and checking it against a base model before use.

Every check runs before any weight reaches the model, and each failure raises AdapterError with a
message that says what is wrong: names, paths (inside an adapter root after symlinks), file set
(safetensors only, never pickle), a corrupt or oversized header, rank, target modules, shapes.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

NAME_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "adapter_model.pkl")
MAX_CONFIG_BYTES = 1 << 20
MAX_HEADER_BYTES = 64 << 20
_KEY_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


class AdapterError(ValueError):
    """An adapter that cannot be used; `reason` is a short label for metrics."""

    def __init__(self, message: str, reason: str = "invalid", status: int = 400):
        super().__init__(message)
        self.reason = reason
        self.status = status


@dataclass
class LoRAWeights:
    """A validated adapter: per base module, A [r, in] and B [out, r], with its scale."""

    name: str
    path: Path
    rank: int
    alpha: float
    scale: float
    target_modules: list[str]
    base_model: str | None
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.modules.values())


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise AdapterError(
            f"invalid adapter name {name!r}: use 1-64 characters from A-Z a-z 0-9 . _ - , not starting with a dot",
            reason="bad_name")
    return name


def resolve_inside(path: str | Path, roots: list[Path]) -> Path:
    """Resolve `path` (symlinks included) and require it to lie inside one of `roots`."""
    if not roots:
        raise AdapterError("loading adapters by path needs an adapter root (--adapter-root)", reason="no_root",
                           status=403)
    try:
        real = Path(path).expanduser().resolve(strict=True)
    except (OSError, RuntimeError):
        raise AdapterError(f"adapter path {str(path)!r} does not exist", reason="not_found", status=404) from None
    if any(Path(root).resolve() in real.parents for root in roots):
        return real
    raise AdapterError(f"adapter path {str(path)!r} is outside the configured adapter roots", reason="outside_root",
                       status=403)


def read_config(folder: Path) -> dict:
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise AdapterError(f"{folder.name}: {CONFIG_FILE} is missing", reason="missing_config")
    if cfg_path.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterError(f"{folder.name}: {CONFIG_FILE} is larger than 1 MiB", reason="bad_config")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{folder.name}: {CONFIG_FILE} is not valid JSON: {exc}", reason="bad_config") from None
    except RecursionError:  # found by tests/test_fuzz_loader.py
        raise AdapterError(f"{folder.name}: {CONFIG_FILE} is nested too deeply", reason="bad_config") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{folder.name}: {CONFIG_FILE} must be a JSON object", reason="bad_config")
    return cfg


def _config_values(cfg: dict, folder: Path, max_rank: int) -> tuple[int, float, float, list[str] | str]:
    where = f"{folder.name}/{CONFIG_FILE}"
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{where}: peft_type {cfg.get('peft_type')!r} is not LORA", reason="unsupported")
    for flag in ("use_dora", "fan_in_fan_out"):
        if cfg.get(flag):
            raise AdapterError(f"{where}: {flag} is not supported", reason="unsupported")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{where}: bias={cfg.get('bias')!r} is not supported (only 'none')", reason="unsupported")
    if cfg.get("modules_to_save"):
        raise AdapterError(f"{where}: modules_to_save is not supported", reason="unsupported")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise AdapterError(f"{where}: per-module rank_pattern/alpha_pattern is not supported", reason="unsupported")
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha", cfg.get("r"))
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterError(f"{where}: r must be a positive integer, got {rank!r}", reason="bad_config")
    if rank > max_rank:
        raise AdapterError(f"{where}: rank {rank} is above the server's max_lora_rank {max_rank}",
                           reason="rank_too_large")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not (0 < alpha < 1e6):
        raise AdapterError(f"{where}: lora_alpha must be a positive number, got {alpha!r}", reason="bad_config")
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        targets = [targets] if re.fullmatch(r"[A-Za-z0-9_.]+", targets) else targets
    if not targets or not (isinstance(targets, str) or (isinstance(targets, list)
                                                         and all(isinstance(t, str) for t in targets))):
        raise AdapterError(f"{where}: target_modules must be a non-empty list of module names", reason="bad_config")
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except (re.error, RecursionError, OverflowError):  # found by tests/test_fuzz_loader.py
            raise AdapterError(f"{where}: target_modules {targets!r} is not a valid regular expression",
                               reason="bad_config") from None
    scale = alpha / (rank ** 0.5) if cfg.get("use_rslora") else alpha / rank
    return rank, float(alpha), float(scale), targets


def read_safetensors_header(path: Path) -> dict:
    """Parse and check the JSON header ourselves, so a hostile header fails cleanly before torch sees it."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise AdapterError(f"{path.parent.name}: {WEIGHTS_FILE} is truncated", reason="corrupt_weights")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise AdapterError(f"{path.parent.name}: {WEIGHTS_FILE} has a corrupt header (length {n})",
                               reason="corrupt_weights")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):  # deep nesting: found by fuzzing
        raise AdapterError(f"{path.parent.name}: {WEIGHTS_FILE} header is not valid JSON",
                           reason="corrupt_weights") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{path.parent.name}: {WEIGHTS_FILE} header is not an object", reason="corrupt_weights")
    data_len = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        ok = (isinstance(info, dict) and isinstance(info.get("dtype"), str) and info["dtype"] in _FLOAT_DTYPES
              and isinstance(info.get("shape"), list) and all(isinstance(d, int) and d >= 0 for d in info["shape"])
              and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
              and all(isinstance(o, int) for o in info["data_offsets"])
              and 0 <= info["data_offsets"][0] <= info["data_offsets"][1] <= data_len)
        if not ok:
            raise AdapterError(f"{path.parent.name}: tensor {key!r} in {WEIGHTS_FILE} has a corrupt entry",
                               reason="corrupt_weights")
    return header


def check_finite(weights: LoRAWeights) -> None:
    """Refuse NaN or infinite values. Kept out of load_lora so an engine can run it on its own thread."""
    for module, (a, b) in weights.modules.items():
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterError(f"{weights.name}: {module} holds NaN or infinite values", reason="bad_weights")


def _matches(module: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):  # PEFT treats a string as a regex over the full module name
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def load_lora(name: str, folder: Path, base_shapes: dict[str, tuple[int, int]], max_rank: int) -> LoRAWeights:
    """Read and validate an adapter folder against the base model's linear shapes {module: (in, out)}."""
    check_name(name)
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(f"adapter path {str(folder)!r} is not a folder", reason="not_found", status=404)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        pickles = [p for p in PICKLE_FILES if (folder / p).exists()]
        if pickles:
            raise AdapterError(f"{folder.name}: only {WEIGHTS_FILE} is accepted; {pickles[0]} (pickle) is refused",
                               reason="pickle_refused")
        raise AdapterError(f"{folder.name}: {WEIGHTS_FILE} is missing", reason="missing_weights")
    for f in (folder / CONFIG_FILE, weights_path):  # a symlinked file must not escape the folder
        if f.is_symlink() and folder.resolve() not in f.resolve().parents:
            raise AdapterError(f"{folder.name}: {f.name} links outside the adapter folder", reason="outside_root",
                               status=403)
    cfg = read_config(folder)
    rank, alpha, scale, targets = _config_values(cfg, folder, max_rank)
    header = read_safetensors_header(weights_path)

    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    keys: dict[tuple[str, str], str] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        m = _KEY_RE.match(key)
        if not m:
            raise AdapterError(f"{folder.name}: unexpected tensor {key!r} (only LoRA A/B weights are supported)",
                               reason="unsupported")
        pairs.setdefault(m["module"], {})[m["ab"]] = tuple(info["shape"])
        keys[(m["module"], m["ab"])] = key
    if not pairs:
        raise AdapterError(f"{folder.name}: {WEIGHTS_FILE} holds no LoRA weights", reason="bad_weights")
    for module, ab in sorted(pairs.items()):
        if module not in base_shapes:
            raise AdapterError(f"{folder.name}: target module {module!r} does not exist in the base model (or is "
                               f"not a supported linear layer)", reason="missing_module")
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{folder.name}: {module} has lora_{''.join(ab)} without its pair", reason="bad_weights")
        in_f, out_f = base_shapes[module]
        if ab["A"] != (rank, in_f) or ab["B"] != (out_f, rank):
            raise AdapterError(
                f"{folder.name}: shapes for {module} are A{list(ab['A'])} B{list(ab['B'])}, but the base layer "
                f"needs A[{rank}, {in_f}] B[{out_f}, {rank}] (rank {rank}); is it an adapter for another base model?",
                reason="shape_mismatch")
    unmatched = [m for m in pairs if not _matches(m, targets)]
    if unmatched:
        raise AdapterError(f"{folder.name}: weights for {unmatched[0]!r} are not in target_modules", reason="bad_weights")

    from safetensors import safe_open

    out = LoRAWeights(name, folder, rank, alpha, scale, list(targets) if isinstance(targets, list) else [targets],
                      cfg.get("base_model_name_or_path"))
    try:
        with safe_open(weights_path, framework="pt") as f:
            for module, _ in sorted(pairs.items()):
                # As stored: the engine converts (and checks for NaN) on its own thread.
                out.modules[module] = (f.get_tensor(keys[(module, "A")]), f.get_tensor(keys[(module, "B")]))
    except AdapterError:
        raise
    except Exception as exc:  # safetensors' own errors for data it cannot read
        raise AdapterError(f"{folder.name}: {WEIGHTS_FILE} is corrupt: {exc}", reason="corrupt_weights") from None
    return out
