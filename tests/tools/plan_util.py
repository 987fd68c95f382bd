"""The plans tools tests inspect: the tiny reference GPT of the pass tests, and hand-made measured steps."""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "passes"))

from pipeline_util import run_until  # noqa: E402

from ratel.ir import Phase, Plan, Span, StepRecord  # noqa: E402

GOLDEN = Path(__file__).parent / "golden"


def tiny_plan() -> Plan:
    """The plan of tests/passes' tiny GPT (2 blocks, CPU profile, fixed budgets): deterministic."""
    _, ctx, _, _ = run_until("verify_plan")
    return ctx.get(Plan)


def fake_record(plan: Plan, slowdown: float = 3.0, gpu_extra: int = 1024) -> StepRecord:
    """A measured step made by hand: each timeline step takes ``slowdown`` times its predicted length, copies
    start with it, the optimizer runs after each backward step; the GPU peaks sit ``gpu_extra`` above plan."""
    spans = []
    clock = 0.0
    for step, time in zip(plan.steps, plan.times.steps):
        length = max(time.compute, time.h2d, time.d2h) * slowdown
        label = step.label(plan.units)
        spans.append(Span("compute", label, clock, clock + time.compute * slowdown, step.index))
        if time.h2d:
            spans.append(Span("h2d", f"copy in {label}", clock, clock + time.h2d * slowdown, step.index, 4096))
        if time.d2h:
            spans.append(Span("d2h", f"copy out {label}", clock, clock + time.d2h * slowdown, step.index, 4096))
        clock += length
        if time.optimizer:
            spans.append(Span("optimizer", f"adamw {label}", clock, clock + time.optimizer * slowdown, step.index))
    spans.append(Span("optimizer", "wait_all", clock, clock + 1e-6, -1))
    peaks = tuple(m.gpu + gpu_extra for m in plan.memory.steps)
    wall = max(s.end for s in spans)
    assert any(s.phase == Phase.BWD for s in plan.steps)
    return StepRecord(spans=tuple(sorted(spans, key=lambda s: (s.start, s.lane, s.label))), gpu_peak_by_step=peaks,
                      gpu_peak=max(peaks), wall=wall)


def assert_golden(name: str, text: str) -> None:
    """Compare with golden/<name>; RATEL_UPDATE_GOLDEN=1 rewrites it (as the pass goldens do)."""
    path = GOLDEN / name
    if os.environ.get("RATEL_UPDATE_GOLDEN"):
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"{path.name} changed; rerun with RATEL_UPDATE_GOLDEN=1 if intended"
