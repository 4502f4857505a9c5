"""Where to spend extra bits: turn a sensitivity scan into per-layer bits under a budget.

`--keep-8bit N` keeps the N layers the scan found most sensitive at 8 bits. `--avg-bits B` adds
8-bit layers, best KL saved per extra stored bit first, while the average stored bits per weight
of the decoder's linear layers (compress/bit_cost.py's count, scales and indices included) stays
at or under B. Either way the result is `module_bits` for compress/quantize.py, and the planned
average that the artifact's manifest will confirm from its files.
"""

from __future__ import annotations

from compress.bit_cost import planned_bits

HIGH_BITS = 8


class BudgetError(ValueError):
    pass


def _cost(row: dict, bits: int, group_size: int) -> float:
    return planned_bits(bits, group_size, row["in_features"], row["out_features"]) * row["weights"]


def average_bits(rows: list[dict], module_bits: dict[str, int], bits: int, group_size: int) -> float:
    total = sum(_cost(r, module_bits.get(r["name"], bits), group_size) for r in rows)
    return total / sum(r["weights"] for r in rows)


def plan(scan: dict, *, bits: int, group_size: int, avg_bits: float | None = None,
         keep_8bit: int | None = None) -> dict:
    """{"module_bits": {name: 8}, "planned_avg_bits": x, "base_avg_bits": y, "rule": ...}."""
    rows = scan["modules"]
    if (avg_bits is None) == (keep_8bit is None):
        raise BudgetError("give one of --avg-bits or --keep-8bit")
    base = average_bits(rows, {}, bits, group_size)
    chosen: dict[str, int] = {}
    if keep_8bit is not None:
        if not 0 <= keep_8bit <= len(rows):
            raise BudgetError(f"--keep-8bit must be between 0 and {len(rows)} (the model's linear layers)")
        for r in sorted(rows, key=lambda r: r["kl"], reverse=True)[:keep_8bit]:
            chosen[r["name"]] = HIGH_BITS
        rule = f"the {keep_8bit} most sensitive layers at {HIGH_BITS} bits"
    else:
        if avg_bits < base:
            raise BudgetError(f"--avg-bits {avg_bits} is below what {bits}-bit group-{group_size} layers store "
                              f"({base:.3f} bits per weight with scales and indices); raise it or lower the group size")
        total_weights = sum(r["weights"] for r in rows)
        spent = base * total_weights
        extra = {r["name"]: _cost(r, HIGH_BITS, group_size) - _cost(r, bits, group_size) for r in rows}
        for r in sorted(rows, key=lambda r: r["kl"] / extra[r["name"]], reverse=True):
            if (spent + extra[r["name"]]) / total_weights <= avg_bits:
                chosen[r["name"]] = HIGH_BITS
                spent += extra[r["name"]]
        rule = f"8-bit layers by KL saved per extra bit while the average stays <= {avg_bits}"
    return {"module_bits": chosen, "planned_avg_bits": round(average_bits(rows, chosen, bits, group_size), 4),
            "base_avg_bits": round(base, 4), "rule": rule,
            "scan_kl_kept": round(sum(r["kl"] for r in rows if r["name"] in chosen), 4),
            "scan_kl_total": round(sum(r["kl"] for r in rows), 4)}
