"""The learned router: logistic regression over prompt features, predicting whether the student's
answer will agree with the teacher's. Trained and saved by `slimserve compress calibrate-router`;
loaded by the `learned` policy. The saved form is plain JSON (weights included): no pickle."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from compress.router_features import featurizer

ROUTER_FILE = "router.json"


class RouterModelError(ValueError):
    """A learned-router folder that cannot be read."""


@dataclass
class LearnedRouter:
    features: str
    weights: np.ndarray
    bias: float
    mean: np.ndarray
    std: np.ndarray
    threshold: float
    manifest: dict = field(default_factory=dict)
    _featurize: object = None

    def scores(self, x: np.ndarray) -> np.ndarray:
        z = ((x - self.mean) / self.std) @ self.weights + self.bias
        return 1.0 / (1.0 + np.exp(-z))

    def student_probability(self, text: str) -> float:
        if self._featurize is None:
            self._featurize = featurizer(self.features)
        return float(self.scores(self._featurize([text]))[0])

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        data = {"format": "slimserve-router-v1", "features": self.features, "threshold": self.threshold,
                "bias": self.bias, "weights": self.weights.tolist(), "mean": self.mean.tolist(),
                "std": self.std.tolist(), **self.manifest}
        path = folder / ROUTER_FILE
        path.write_text(json.dumps(data, indent=1))
        return path

    @classmethod
    def load(cls, folder: Path) -> "LearnedRouter":
        path = Path(folder) / ROUTER_FILE
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise RouterModelError(f"cannot read a learned router from {path}: {exc}") from exc
        known = {"format", "features", "threshold", "bias", "weights", "mean", "std"}
        return cls(features=data["features"], weights=np.asarray(data["weights"], dtype=np.float32),
                   bias=float(data["bias"]), mean=np.asarray(data["mean"], dtype=np.float32),
                   std=np.asarray(data["std"], dtype=np.float32), threshold=float(data["threshold"]),
                   manifest={k: v for k, v in data.items() if k not in known})


def fit(x: np.ndarray, y: np.ndarray, *, l2: float = 1.0, steps: int = 300) -> tuple[np.ndarray, float, np.ndarray,
                                                                                         np.ndarray]:
    """Standardise, then L2-regularised logistic regression by Newton's method (small, exact, no extra
    dependency). Returns weights, bias, mean, std."""
    mean = x.mean(0)
    std = x.std(0) + 1e-6
    z = np.hstack([(x - mean) / std, np.ones((len(x), 1), dtype=np.float64)])
    w = np.zeros(z.shape[1])
    reg = np.full(z.shape[1], l2)
    reg[-1] = 0.0  # the bias is not shrunk
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(z @ w)))
        grad = z.T @ (p - y) + reg * w
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(reg + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-6:
            break
    return w[:-1].astype(np.float32), float(w[-1]), mean.astype(np.float32), std.astype(np.float32)
