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

import torch.fx as fx

from ratel.errors import BudgetError, PlanViolation
from ratel.ir import (ActivationPlan, CostModel, Lifetimes, MemoryProfile, PlacementPlan, Plan, Schedule, Tier,
                      format_bytes, step_index)
from ratel.passes.manager import PassContext, PassResult, graph_pass
from ratel.passes.simulate import predict_times, simulate_memory
from ratel.ir import ops


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
    bwd = step_index(lifetimes.steps)[1]
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


def _budget_message(ctx: PassContext, memory: MemoryProfile, budget: int) -> str:
    units = ctx.traced.units
    step = ctx.get(Lifetimes).steps[memory.gpu_peak_step]
    peak = memory.steps[memory.gpu_peak_step]
    parts = ", ".join(f"{name} {format_bytes(b)}" for name, b in peak.breakdown if b)
    return (f"GPU budget {format_bytes(budget)} is too small: this model and batch need at least "
            f"{format_bytes(memory.gpu_peak)} on the GPU (peak at step {memory.gpu_peak_step}, "
            f"{step.label(units)}: {parts}). Raise the budget to at least {format_bytes(memory.gpu_peak)}, "
            "or lower the batch size or sequence length to shrink the activations.")


@graph_pass(requires=("analysis:Lifetimes", "analysis:PlacementPlan", "analysis:Schedule", "analysis:CostModel"),
            ensures=("analysis:Plan",))
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
                memory=memory, times=predict_times(ctx, schedule.transfers, ctx.analyses.get(ActivationPlan)),
                activations=ctx.analyses.get(ActivationPlan), budget_gpu=budget_gpu,
                budget_host=budget_host, compute_dtype=ctx.compute_dtype, device=ctx.device, ranks=ctx.ranks)
    return PassResult(gm, modified=False, analysis=plan)
