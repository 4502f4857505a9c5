"""A tiny teacher, its pruned student and a training text: what the distillation tests start from."""

from __future__ import annotations

from pathlib import Path

from compress.prune import prune
from tests.tiny_model import build_tiny_model


def build_pair(root: Path) -> tuple[Path, Path, Path]:
    teacher = build_tiny_model(root / "teacher", layers=4)
    text = root / "train.txt"
    text.write_text("\n\n".join(f"Passage {i}: the quick brown fox jumps over the lazy dog, number {i}."
                                for i in range(60)))
    prune(teacher, root / "student", calib=text, drop=2)
    return teacher, root / "student", text
