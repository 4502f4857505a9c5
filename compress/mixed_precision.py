"""Quantize with 8 bits where a measurement says they matter: scan, budget, quantize, record.

`compress quantize --avg-bits B` / `--keep-8bit N` (and a recipe's quantize stage) run the
sensitivity scan on the calibration text (or read a saved scan, `--sensitivity scan.json`), turn it
into per-layer bits (compress/bit_budget.py) and quantize with them; the artifact keeps the scan
(`sensitivity.json` + its heatmap) and its manifest records the plan beside the per-layer bits and
the bits per weight measured from its files.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from compress.bit_budget import plan
from compress.manifest import read_manifest, write_manifest


class MixedPrecisionError(ValueError):
    pass


def load_or_scan(spec, sensitivity: Path | None, progress: bool) -> dict:
    from compress.sensitivity import scan

    if sensitivity is not None:
        result = json.loads(Path(sensitivity).read_text())
        made = result.get("recipe", {})
        if (made.get("bits"), made.get("group_size")) != (spec.bits, spec.group_size):
            raise MixedPrecisionError(f"{sensitivity} was scanned at {made.get('bits')} bits, group "
                                      f"{made.get('group_size')}; this recipe is {spec.bits} bits, group "
                                      f"{spec.group_size}: scan again (`compress sensitivity`)")
        return result
    if spec.calib in (None, "self") or not Path(spec.calib).is_file():
        raise MixedPrecisionError("the sensitivity scan needs text: give --calib FILE, or a saved scan "
                                  "with --sensitivity scan.json (`slimserve compress sensitivity`)")
    return scan(spec.model, Path(spec.calib), bits=spec.bits, group_size=spec.group_size, sym=spec.sym,
                progress=progress)


def quantize_with_budget(spec, *, avg_bits: float | None = None, keep_8bit: int | None = None,
                         sensitivity: Path | str | None = None, progress=None, scan_progress: bool = True) -> dict:
    """Scan (or read the scan), plan the per-layer bits, quantize, and record the plan."""
    from compress.quantize import quantize
    from compress.sensitivity import write_scan

    result = load_or_scan(spec, Path(sensitivity) if sensitivity else None, scan_progress)
    budget = plan(result, bits=spec.bits, group_size=spec.group_size, avg_bits=avg_bits, keep_8bit=keep_8bit)
    quantize(dataclasses.replace(spec, module_bits=budget["module_bits"] or None), progress)
    write_scan(result, Path(spec.out) / "sensitivity.json")
    manifest = read_manifest(spec.out) or {}
    fields = {k: v for k, v in manifest.items() if k not in ("kind", "created")}
    fields["bit_budget"] = {k: v for k, v in budget.items() if k != "module_bits"}
    fields["sensitivity"] = {"text": result.get("text"), "tokens": result.get("tokens"),
                             "recipe": result.get("recipe"), "file": "sensitivity.json"}
    write_manifest(spec.out, manifest.get("kind", "quantized-model"), **fields)
    return fields

