"""What each model is doing while the server starts: stage (converting, hashing, calibrating,
quantizing layer i/n, loading, ready) and progress, for `/ready`'s 503 body, the
`slimserve_model_load_progress{model,stage}` gauge, and the operator: a progress bar on a terminal,
one log line per stage otherwise. Written by the loading thread, read by HTTP threads."""

from __future__ import annotations

import logging
import sys
import threading
import time

log = logging.getLogger(__name__)


class LoadProgress:
    def __init__(self, gauge=None, *, bars: bool | None = None):
        self._gauge = gauge  # prometheus Gauge with labels (model, stage); value: 0..1 of the stage
        self._lock = threading.Lock()
        self._models: dict[str, dict] = {}
        self._bars = sys.stderr.isatty() if bars is None else bars
        self._bar = None

    def stage(self, model: str, stage: str, done: int | None = None, total: int | None = None) -> None:
        with self._lock:
            now = time.monotonic()
            row = self._models.get(model)
            new_stage = row is None or row["stage"] != stage
            if new_stage:
                if row is not None and self._gauge is not None:
                    self._gauge.labels(model, row["stage"]).set(1.0)
                row = {"stage": stage, "started": now, "seconds_in_stage": 0.0}
                self._models[model] = row
            row["seconds_in_stage"] = round(now - row["started"], 1)
            fraction = (done / total) if done is not None and total else (1.0 if stage == "ready" else 0.0)
            unit = "layer" if stage == "quantizing" else "sample" if stage == "calibrating" else "step"
            detail = f"{stage} {unit} {done}/{total}" if done is not None and total else stage
            row.update(done=done, total=total, progress=round(fraction, 4), detail=detail)
            if self._gauge is not None:
                self._gauge.labels(model, stage).set(fraction)
        if new_stage:
            self._close_bar()
            log.info("%s: %s", model, stage)
        self._draw(model, stage, done, total)

    def snapshot(self) -> dict[str, dict]:
        """{model: {stage, done, total, progress, seconds_in_stage}} for /ready while loading."""
        with self._lock:
            now = time.monotonic()
            return {m: {**{k: v for k, v in r.items() if k != "started"},
                        "seconds_in_stage": round(now - r["started"], 1)} for m, r in self._models.items()}

    def _draw(self, model: str, stage: str, done: int | None, total: int | None) -> None:
        if not self._bars or total is None:
            return
        from tqdm import tqdm

        if self._bar is None:
            self._bar = tqdm(total=total, desc=f"{model}: {stage}", unit="step", leave=False)
        self._bar.n = done or 0
        self._bar.refresh()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
