"""Simulation shared by the planning passes: GPU and host memory step by step, and step time per lane.

Not a pass: plan_activations evaluates candidate plans with it, verify_plan checks the final one.
"""
from __future__ import annotations

import torch.fx as fx

from ratel.ir import (META_TENSOR, ActivationPlan, CostModel, Lifetimes, MemoryProfile, Phase, PlacementPlan,
                      StepMemory, StepTime, Tier, TimeProfile)
from ratel.passes.build_lifetimes import boundary_values, unit_calls
from ratel.passes.manager import PassContext
from ratel.passes.plan_placement import host_usage, ssd_state_bytes, uses_torch_adam


def _user_outputs(gm: fx.GraphModule, boundary: dict) -> list[tuple[str, int]]:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    out = []
    for node in output.all_input_nodes:
        meta = node.meta.get(META_TENSOR)
        if meta is not None and node.name not in boundary and node.op != "placeholder":
            out.append((node.name, meta.value_bytes))
    return out


def resident_buffer_bytes(gm: fx.GraphModule) -> int:
    """Buffers and constants stay on the GPU for the whole run (rotary tables, masks: small)."""
    sizes: dict[str, int] = {}
    for _, call in unit_calls(gm):
        placeholders = [n for n in getattr(gm, call.module).graph.nodes if n.op == "placeholder"]
        start = len(call.inputs) + len(call.params)
        for name, node in zip(call.buffers, placeholders[start:]):
            meta = node.meta.get(META_TENSOR)
            sizes[name] = meta.value_bytes if meta else 0
    return sum(sizes.values())


def saved_bytes_alive(acts: ActivationPlan | None, unit: int, t: int, fwd: dict, bwd: dict) -> int:
    """GPU bytes of a saved-mode unit's saved values at step t (outside the unit's own forward step):
    kept values from its forward to its backward; swapped ones while their copy out runs (the next step)
    and from the step before their backward (prefetch); recomputed ones during its backward."""
    if acts is None or acts.of(unit).mode != "saved":
        return 0
    plan = acts.of(unit)
    f, b = fwd[unit], bwd[unit]
    total = 0
    if f < t <= b:
        total += plan.bytes_on(Tier.GPU)
    if t == f + 1 or b - 1 <= t <= b:
        total += plan.bytes_on(Tier.HOST) + plan.bytes_on(Tier.SSD)
    if t == b:
        total += plan.bytes_on(None)
    return total


def simulate_memory(gm: fx.GraphModule, ctx: PassContext, acts: ActivationPlan | None = None) -> MemoryProfile:
    acts = acts if acts is not None else ctx.analyses.get(ActivationPlan)
    placement = ctx.get(PlacementPlan)
    lifetimes = ctx.get(Lifetimes)
    costs = {c.unit: c for c in ctx.get(CostModel).units}
    steps = lifetimes.steps
    fwd = {s.unit: s.index for s in steps if s.phase == Phase.FWD}
    bwd = {s.unit: s.index for s in steps if s.phase == Phase.BWD}
    boundary = boundary_values(gm)
    ring = placement.depth * placement.slot_bytes
    resident = resident_buffer_bytes(gm)
    user_outputs = _user_outputs(gm, boundary)
    grad_bytes = {u.index: sum(g.nbytes for g in lifetimes.groups if g.trainable and u.index in g.users)
                  for u in ctx.traced.units}
    # A group read by several units accumulates its gradient on the GPU from its first backward to its last.
    shared = [(bwd[max(g.users)], bwd[min(g.users)], g.nbytes) for g in lifetimes.groups
              if g.trainable and len(g.users) > 1]

    profile = []
    for step in steps:
        t = step.index
        boundary_acts = 0
        for act in placement.activations:
            produced = fwd[act.producer] if act.producer >= 0 else 0
            if step.phase == Phase.FWD and act.producer == step.unit:
                continue   # counted inside the unit's forward workspace
            if act.tier == Tier.GPU:
                alive = produced <= t <= bwd[min(act.consumers)]
            else:
                alive = produced <= t <= max(fwd[c] for c in act.consumers) or any(
                    bwd[c] - 1 <= t <= bwd[c] for c in act.consumers)
            boundary_acts += act.nbytes if alive else 0
        cost = costs[step.unit]
        saved_mode = acts is not None and acts.of(step.unit).mode == "saved"
        if step.phase == Phase.FWD:
            workspace = cost.grad_fwd_workspace if saved_mode else cost.fwd_workspace
            held = 0   # the user's outputs come from the last unit, inside its workspace
            in_flight = 0
        else:
            workspace = cost.bwd_only_workspace if saved_mode else cost.bwd_workspace
            held = sum(b for _, b in user_outputs)
            previous = steps[t - 1]
            in_flight = grad_bytes[previous.unit] if previous.phase == Phase.BWD else 0
        accumulating = sum(b for first, last, b in shared if first <= t <= last)
        saved = sum(saved_bytes_alive(acts, u.index, t, fwd, bwd) for u in ctx.traced.units
                    if not (step.phase == Phase.FWD and u.index == step.unit))
        parts = (("param ring", ring), ("resident buffers", resident), ("activations", boundary_acts),
                 ("saved activations", saved),
                 ("unit workspace", workspace), ("gradients in flight", in_flight),
                 ("shared gradients", accumulating), ("user outputs", held))
        profile.append(StepMemory(step=t, gpu=sum(b for _, b in parts), breakdown=parts))
    peak = max(profile, key=lambda s: s.gpu)

    host = host_usage(lifetimes.groups, dict(placement.optimizer_tier), placement.activations, uses_torch_adam())
    ssd_total = sum(ssd_state_bytes(g) for g in lifetimes.groups
                    if g.trainable and placement.optimizer_tier_of(g.name) == Tier.SSD)
    if acts is not None:
        from ratel.runtime.saved import saved_host_bytes
        swapped, staging = saved_host_bytes(acts)
        if swapped:
            host = host + (("saved activations (pinned)", swapped),)
        if staging:
            host = host + (("saved activations SSD staging (pinned)", staging),)
        ssd_total += sum(d.nbytes for u in acts.units for d in u.decisions if d.tier == Tier.SSD)
    return MemoryProfile(steps=tuple(profile), gpu_peak=peak.gpu, gpu_peak_step=peak.step,
                         host_bytes=host, host_total=sum(b for _, b in host), ssd_total=ssd_total)


def predict_times(ctx: PassContext, transfers, acts: ActivationPlan | None = None) -> TimeProfile:
    """Seconds per step on each lane. A step lasts as long as its longest GPU-side lane (compute with any
    recompute, H2D, D2H); the CPU optimizer and the SSD are queues of their own: an update starts when its
    gradient has landed and its states are read; a saved activation read from SSD must land before the H2D
    copy that needs it. The step ends when the GPU lanes and the optimizer are both done."""
    hw = ctx.hardware
    lifetimes = ctx.get(Lifetimes)
    costs = {c.unit: c for c in ctx.get(CostModel).units}
    rate = hw.gpu_tflops * 1e12 * hw.matmul_efficiency
    by_step: dict[int, list] = {}
    for t in transfers:
        by_step.setdefault(t.step, []).append(t)
    read_done: dict[str, float] = {}
    times = []
    gpu_clock = optimizer_clock = ssd_clock = 0.0
    for step in lifetimes.steps:
        cost = costs[step.unit]
        saved_mode = acts is not None and acts.of(step.unit).mode == "saved"
        if step.phase == Phase.FWD:
            compute = cost.fwd_flops / rate
        elif saved_mode:
            compute = cost.bwd_flops / rate + sum(d.recompute_seconds for d in acts.of(step.unit).decisions
                                                  if d.tier is None)
        else:
            compute = (cost.fwd_flops + cost.bwd_flops) / rate
        at = by_step.get(step.index, [])
        h2d = sum(t.nbytes for t in at if t.kind in ("fetch_params", "fetch_activation", "fetch_saved")) \
            / (hw.h2d_gbps * 1e9)
        d2h = sum(t.nbytes for t in at if t.kind in ("offload_activation", "flush_grads", "offload_saved")) \
            / (hw.d2h_gbps * 1e9)
        ssd = 0.0
        start = gpu_clock
        for t in at:
            if t.kind in ("ssd_read_states", "ssd_read_saved"):
                seconds = t.nbytes / (hw.ssd_read_gbps * 1e9)
                ssd_clock = max(ssd_clock, start) + seconds
                read_done[t.subject] = ssd_clock
                ssd += seconds
        # An H2D copy of a saved activation read from SSD cannot start before the read lands.
        waits = [read_done.get(t.subject, 0.0) for t in at if t.kind == "fetch_saved"]
        begin = max([start] + waits)
        gpu_clock = begin + max(compute, h2d, d2h)
        opt = 0.0
        for t in at:
            if t.kind == "optimizer_step":
                seconds = t.nbytes / 16 / (hw.cpu_adam_gparams * 1e9)
                optimizer_clock = max(optimizer_clock, gpu_clock, read_done.get(t.subject, 0.0)) + seconds
                opt += seconds
        for t in at:
            if t.kind in ("ssd_write_states", "ssd_write_saved"):
                seconds = t.nbytes / (hw.ssd_write_gbps * 1e9)
                ready = optimizer_clock if t.kind == "ssd_write_states" else gpu_clock
                ssd_clock = max(ssd_clock, ready) + seconds
                ssd += seconds
        times.append(StepTime(step.index, compute, h2d, d2h, opt, ssd))
    # Write-backs of optimizer states may finish during the next forward; the next step's reads wait for them.
    return TimeProfile(steps=tuple(times), total=max(gpu_clock, optimizer_clock))


