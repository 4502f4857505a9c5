"""Each served model's cost per output token, and what a routed answer saved against the policy's
reference (its teacher).

A model's cost comes from its `cost:` setting in serve.yaml, else from the `cost` its folder's
manifest records (`slimserve compress eval --write-cost`). Saved = the reference's cost of the tokens
served minus what was spent (an escalated cascade pays for the student's tokens and the teacher's),
as device-seconds and as a fraction of the reference's."""

from __future__ import annotations

import logging

from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger(__name__)
IN_PROCESS = ("int8", "int4", "nf4", "fp8")  # quantization at load that keeps serving from the original folder


class ModelCost(BaseModel):
    """The `cost:` of a model entry; the same fields as compress/cost.py writes in a manifest."""

    model_config = ConfigDict(extra="forbid")
    seconds_per_token: float = Field(..., gt=0, description="device-seconds per output token (CPU time on CPU)")
    device: str = "cpu"
    threads: int | None = Field(None, ge=1)
    batch: int = Field(1, ge=1)
    dtype: str | None = None
    weight_bytes: int | None = Field(None, ge=0)
    kv_bytes_per_token: int | None = Field(None, ge=0)
    wall_seconds_per_token: float | None = Field(None, gt=0)
    measured: str | None = None


def model_costs(settings, engines: dict) -> dict[str, ModelCost]:
    """name -> cost for every served model whose cost is known. A manifest's cost describes its folder as
    stored, so it is not used for a model quantized in process at load (int8, int4, nf4, fp8): give that
    entry its own `cost:`. A GPTQ/AWQ/RTN model quantized at load is served from its cache folder, whose
    manifest counts; so does a quantized artifact's."""
    from compress.cost import read_cost

    costs: dict[str, ModelCost] = {}
    for entry in settings.entries():
        if getattr(entry, "cost", None) is not None:
            costs[entry.name] = entry.cost
            continue
        engine = engines.get(entry.name)
        source = getattr(engine, "source", None)
        if engine is None or not engine.capabilities.local or not source \
                or settings.for_entry(entry).quantization in IN_PROCESS:
            continue
        recorded = read_cost(source)
        if recorded is None:
            continue
        try:
            costs[entry.name] = ModelCost.model_validate(recorded)
        except ValidationError as exc:
            log.warning("%s: ignoring the cost in %s/slimserve.json: %s", entry.name, source, exc.errors()[0]["msg"])
    return costs


def reference_of(policy, costs: dict[str, ModelCost]) -> str | None:
    """What a policy's savings are measured against: its teacher (cascade, learned), else the costliest
    served model with a known cost (fixed, rules): what the traffic would cost without routing."""
    teacher = getattr(policy, "teacher", None)
    if teacher is not None:
        return teacher if teacher in costs else None
    return max(costs, key=lambda t: costs[t].seconds_per_token) if costs else None


def fraction(reference_seconds: float, spent_seconds: float) -> float | None:
    """Cost saved as a share of the reference's: 1 - spent / reference (negative when routing cost more)."""
    return None if reference_seconds <= 0 else 1.0 - spent_seconds / reference_seconds
