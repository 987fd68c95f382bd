"""Plan summary table (filled out by the inspection work; a minimal table for now)."""
from __future__ import annotations

from ratel.ir import format_bytes


def plan_summary(plan, measured=None) -> str:
    lines = [f"{'unit':<24}{'params':>12}{'fwd GFLOP':>12}{'bwd workspace':>16}"]
    for unit, cost in zip(plan.units, plan.costs.units):
        lines.append(f"{unit.name:<24}{format_bytes(cost.param_bytes):>12}{cost.fwd_flops / 1e9:>12.2f}"
                     f"{format_bytes(cost.bwd_workspace):>16}")
    lines.append(f"GPU peak {format_bytes(plan.memory.gpu_peak)} of {format_bytes(plan.budget_gpu)}; "
                 f"host {format_bytes(plan.memory.host_total)}; predicted step {plan.times.total * 1e3:.1f} ms")
    return "\n".join(lines)
