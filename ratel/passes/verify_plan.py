"""verify_plan: check the plan before anything runs, simulate its memory and time, and emit the Plan.

Stages:
  1. Invariants (``check_plan_invariants``, also run after every pass in debug mode): every unit waits
     for its parameters after they were prefetched; a prefetch never overwrites a slot whose unit is not
     released; every activation checkpointed to host is fetched back before each backward that reads it.
  2. Memory, step by step (``simulate_memory``): on the GPU the parameter ring, resident buffers, live
     activations (kept ones until their last backward reader; host ones while read in forward and from one
     step before each backward reader), the unit's measured workspace, gradients still being copied out,
     and the outputs the user holds. On the host: fp32 master and Adam states, compute copies, gradient
     staging, the activation pool.
  3. Refuse a budget below the peak, naming the minimum it needs and where the peak is.
  4. Predict the step time per lane (compute, H2D, D2H, CPU optimizer) from the hardware profile.

Before / after: the graph is unchanged; the ``Plan`` analysis is the contract the runtime executes.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ratel.errors import BudgetError, PlanViolation
from ratel.ir import (META_TENSOR, CostModel, Lifetimes, MemoryProfile, Phase, Plan, PlacementPlan, Schedule,
                      StepMemory, StepTime, Tier, TimeProfile, format_bytes)
from ratel.passes.build_lifetimes import boundary_values, unit_calls
from ratel.passes.manager import PassContext, PassResult, graph_pass
from ratel.passes.plan_placement import host_usage, ssd_state_bytes, uses_torch_adam
from ratel.runtime import ops


def check_plan_invariants(gm: fx.GraphModule, ctx: PassContext) -> None:
    """Raise PlanViolation if the forward graph or the backward schedule can use something not there."""
    if Schedule not in ctx.analyses:
        return
    schedule = ctx.analyses[Schedule]
    # Before insert_releases ran, slots are never freed, so occupancy can only be checked after it.
    releases_inserted = any(t.kind == "release_params" for t in schedule.transfers)
    occupied: dict[int, str] = {}
    slot_of: dict[str, int] = {}
    ready: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is ops.prefetch_params:
            unit, slot = node.args[1], node.args[2]
            if releases_inserted and occupied.get(slot) not in (None, unit):
                raise PlanViolation(f"{node.name}: prefetch of {unit} into slot {slot} overwrites "
                                    f"{occupied[slot]}, which is not released")
            occupied[slot] = unit
            slot_of[unit] = slot
        elif node.target is ops.wait_params:
            if slot_of.get(node.args[1]) is None:
                raise PlanViolation(f"{node.name}: waits for {node.args[1]}, whose parameters were never prefetched")
            ready.add(node.args[1])
        elif node.target is ops.run_unit:
            if node.args[1] not in ready:
                raise PlanViolation(f"{node.name}: runs {node.args[1]} before waiting for its parameters")
        elif node.target is ops.release_params:
            unit = node.args[1]
            if unit not in ready:
                raise PlanViolation(f"{node.name}: releases {unit}, which holds no slot")
            ready.discard(unit)
            occupied.pop(slot_of.pop(unit), None)
    placement = ctx.get(PlacementPlan)
    lifetimes = ctx.get(Lifetimes)
    bwd = {s.unit: s.index for s in lifetimes.steps if s.phase == Phase.BWD}
    fetched = {(t.subject, t.needed_by) for t in schedule.transfers if t.kind == "fetch_activation"}
    for act in placement.activations:
        if act.tier != Tier.HOST:
            continue
        for consumer in act.consumers:
            if (act.value, bwd[consumer]) not in fetched:
                raise PlanViolation(f"activation {act.value} is checkpointed to host but never fetched back for "
                                    f"the backward of {ctx.traced.units[consumer].name}")
    for t in schedule.transfers:
        if t.step > t.needed_by:
            raise PlanViolation(f"{t.kind} of {t.subject} is issued at step {t.step}, after it is needed "
                                f"(step {t.needed_by})")


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


def simulate_memory(gm: fx.GraphModule, ctx: PassContext) -> MemoryProfile:
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
        acts = 0
        for act in placement.activations:
            produced = fwd[act.producer] if act.producer >= 0 else 0
            if step.phase == Phase.FWD and act.producer == step.unit:
                continue   # counted inside the unit's forward workspace
            if act.tier == Tier.GPU:
                alive = produced <= t <= bwd[min(act.consumers)]
            else:
                alive = produced <= t <= max(fwd[c] for c in act.consumers) or any(
                    bwd[c] - 1 <= t <= bwd[c] for c in act.consumers)
            acts += act.nbytes if alive else 0
        cost = costs[step.unit]
        if step.phase == Phase.FWD:
            workspace = cost.fwd_workspace
            held = 0   # the user's outputs come from the last unit, inside its workspace
            in_flight = 0
        else:
            workspace = cost.bwd_workspace
            held = sum(b for _, b in user_outputs)
            previous = steps[t - 1]
            in_flight = grad_bytes[previous.unit] if previous.phase == Phase.BWD else 0
        accumulating = sum(b for first, last, b in shared if first <= t <= last)
        parts = (("param ring", ring), ("resident buffers", resident), ("activations", acts),
                 ("unit workspace", workspace), ("gradients in flight", in_flight),
                 ("shared gradients", accumulating), ("user outputs", held))
        profile.append(StepMemory(step=t, gpu=sum(b for _, b in parts), breakdown=parts))
    peak = max(profile, key=lambda s: s.gpu)

    host = host_usage(lifetimes.groups, dict(placement.optimizer_tier), placement.activations, uses_torch_adam())
    ssd_total = sum(ssd_state_bytes(g) for g in lifetimes.groups
                    if g.trainable and placement.optimizer_tier_of(g.name) == Tier.SSD)
    return MemoryProfile(steps=tuple(profile), gpu_peak=peak.gpu, gpu_peak_step=peak.step,
                         host_bytes=host, host_total=sum(b for _, b in host), ssd_total=ssd_total)


def predict_times(ctx: PassContext, schedule: Schedule) -> TimeProfile:
    """Seconds per step on each lane. A step lasts as long as its longest GPU-side lane (compute, H2D, D2H);
    the CPU optimizer and the SSD are queues of their own: an update starts when its gradient has landed and
    its states are read, and the step ends when the GPU lanes and the optimizer are both done."""
    hw = ctx.hardware
    lifetimes = ctx.get(Lifetimes)
    costs = {c.unit: c for c in ctx.get(CostModel).units}
    rate = hw.gpu_tflops * 1e12 * hw.matmul_efficiency
    by_step: dict[int, list] = {}
    for t in schedule.transfers:
        by_step.setdefault(t.step, []).append(t)
    read_done: dict[str, float] = {}
    times = []
    gpu_clock = optimizer_clock = ssd_clock = 0.0
    for step in lifetimes.steps:
        cost = costs[step.unit]
        flops = cost.fwd_flops if step.phase == Phase.FWD else cost.fwd_flops + cost.bwd_flops
        at = by_step.get(step.index, [])
        h2d = sum(t.nbytes for t in at if t.kind in ("fetch_params", "fetch_activation")) / (hw.h2d_gbps * 1e9)
        d2h = sum(t.nbytes for t in at if t.kind in ("offload_activation", "flush_grads")) / (hw.d2h_gbps * 1e9)
        ssd = 0.0
        for t in at:
            if t.kind == "ssd_read_states":
                seconds = t.nbytes / (hw.ssd_read_gbps * 1e9)
                ssd_clock = max(ssd_clock, gpu_clock) + seconds
                read_done[t.subject] = ssd_clock
                ssd += seconds
        compute = flops / rate
        gpu_clock += max(compute, h2d, d2h)
        opt = 0.0
        for t in at:
            if t.kind == "optimizer_step":
                seconds = t.nbytes / 16 / (hw.cpu_adam_gparams * 1e9)
                optimizer_clock = max(optimizer_clock, gpu_clock, read_done.get(t.subject, 0.0)) + seconds
                opt += seconds
        for t in at:
            if t.kind == "ssd_write_states":
                seconds = t.nbytes / (hw.ssd_write_gbps * 1e9)
                ssd_clock = max(ssd_clock, optimizer_clock) + seconds
                ssd += seconds
        times.append(StepTime(step.index, compute, h2d, d2h, opt, ssd))
    # Write-backs may finish during the next forward; reads of the next step wait for them.
    return TimeProfile(steps=tuple(times), total=max(gpu_clock, optimizer_clock))


def _budget_message(ctx: PassContext, memory: MemoryProfile, budget: int) -> str:
    units = ctx.traced.units
    step = ctx.get(Lifetimes).steps[memory.gpu_peak_step]
    peak = memory.steps[memory.gpu_peak_step]
    parts = ", ".join(f"{name} {format_bytes(b)}" for name, b in peak.breakdown if b)
    return (f"GPU budget {format_bytes(budget)} is too small: this model and batch need at least "
            f"{format_bytes(memory.gpu_peak)} on the GPU (peak at step {memory.gpu_peak_step}, "
            f"{step.label(units)}: {parts}). Raise the budget to at least {format_bytes(memory.gpu_peak)}, "
            "or lower the batch size or sequence length to shrink the activations.")


@graph_pass(requires=("analysis:Schedule", "analysis:CostModel"), ensures=("analysis:Plan",))
def verify_plan(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    check_plan_invariants(gm, ctx)
    memory = simulate_memory(gm, ctx)
    budget_gpu = int(ctx.budget.gpu)
    if memory.gpu_peak > budget_gpu:
        raise BudgetError(_budget_message(ctx, memory, budget_gpu), tier="gpu", needed=memory.gpu_peak,
                          budget=budget_gpu)
    budget_host = int(ctx.budget.host)
    if memory.host_total > budget_host:
        biggest = sorted(memory.host_bytes, key=lambda kv: -kv[1])[:3]
        hint = ("" if ctx.budget.ssd_dir else
                " or give Budget(ssd_dir=...) so optimizer states can live on an SSD")
        raise BudgetError(
            f"host budget {format_bytes(budget_host)} is too small: the plan keeps "
            f"{format_bytes(memory.host_total)} in host memory (largest: "
            + ", ".join(f"{k} {format_bytes(v)}" for k, v in biggest)
            + f"). Raise Budget(host=...) to at least {format_bytes(memory.host_total)}{hint}.",
            tier="host", needed=memory.host_total, budget=budget_host)
    if ctx.budget.ssd is not None and memory.ssd_total > ctx.budget.ssd:
        raise BudgetError(f"SSD budget {format_bytes(ctx.budget.ssd)} is too small: the optimizer states placed "
                          f"on SSD take {format_bytes(memory.ssd_total)}. Raise Budget(ssd=...) or the host budget.",
                          tier="ssd", needed=memory.ssd_total, budget=int(ctx.budget.ssd))
    schedule = ctx.get(Schedule)
    lifetimes = ctx.get(Lifetimes)
    plan = Plan(units=ctx.traced.units, groups=lifetimes.groups, steps=lifetimes.steps,
                placement=ctx.get(PlacementPlan), transfers=schedule.transfers, costs=ctx.get(CostModel),
                memory=memory, times=predict_times(ctx, schedule), budget_gpu=budget_gpu,
                budget_host=budget_host, compute_dtype=ctx.compute_dtype, device=ctx.device)
    return PassResult(gm, modified=False, analysis=plan)
