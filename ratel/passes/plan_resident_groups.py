"""plan_resident_groups: keep whole parameter groups on the GPU, updated there, where that shortens the step.

A group resident on the GPU holds its compute copy, fp32 master and Adam moments there for the whole run
(``ir.layout.device_state_bytes``): it is never streamed in, its gradient never leaves, and torch's fused
AdamW updates it on the GPU right after the backward that completes it (with clipping: once the global norm
is known). Its new weights are copied to the host copy the model object's parameters alias. The groups
whose gradients arrive last — the first units' — shorten the CPU optimizer's tail most, and a small batch
is bound by that tail (issue #11: AdamW over 3.6B parameters on 16 cores outlasts the backward).

Stages:
  1. Candidates: every group (frozen ones save their streaming only), in the order their gradients arrive
     last: by the unit that completes them, the first unit first. Not for a CPU target unless
     ``ctx.resident`` asks (the "GPU" is the host there), nor when ``ctx.resident_groups`` fixes the set (an
     engine's later input shapes keep its first plan's groups, which the parameter store holds; or the user
     named them: ``compile(resident=[...])``). With
     several ranks a resident group is whole on each, its gradient averaged over the GPUs before the update.
  2. For k = 1, 2, ... the first k candidates resident: the slot layouts without them, the activation plan
     chosen again for the GPU memory they leave (plan_activations' search), priced with the shared
     simulation. The search stops at the first k that does not fit the GPU or host budget, or after two that
     are not faster than the best so far.
  3. The fastest plan wins; equal times keep fewer groups resident (k = 0: the plan as it came).

Before / after: the graph is unchanged; the ``PlacementPlan`` and ``ActivationPlan`` analyses are replaced::

    param_tier: (embed: host, blocks.0: host, ...)
  ->
    param_tier: (embed: gpu, blocks.0: gpu, blocks.1: host, ...)
"""
from __future__ import annotations

import dataclasses

import torch.fx as fx

from ratel.errors import RatelError
from ratel.ir import ActivationPlan, Lifetimes, PlacementPlan, Tier
from ratel.ir.layout import device_state_bytes
from ratel.passes.insert_transfers import plan_transfers
from ratel.passes.manager import PassContext, PassResult, graph_pass
from ratel.passes.plan_activations import choose_activations
from ratel.passes.plan_placement import slot_layouts
from ratel.passes.simulate import predict_times, simulate_memory

# A candidate must beat the best plan by this fraction: a tie keeps the groups streaming.
MIN_GAIN = 1e-3


def with_resident(placement: PlacementPlan, lifetimes: Lifetimes, units, names: set[str]) -> PlacementPlan:
    """``placement`` with the groups ``names`` resident on the GPU (weights and optimizer states), the ring's
    slots laid out without them."""
    param_tier = tuple((name, Tier.GPU if name in names else tier) for name, tier in placement.param_tier)
    optimizer_tier = tuple((name, Tier.GPU if name in names else tier) for name, tier in placement.optimizer_tier)
    streamed = [g for g in lifetimes.groups if g.name not in names]
    layouts = slot_layouts(units, streamed)
    return dataclasses.replace(placement, param_tier=param_tier, optimizer_tier=optimizer_tier, layouts=layouts,
                               slot_bytes=max((layout.nbytes for layout in layouts), default=0))


def candidates(lifetimes: Lifetimes) -> list:
    """Every group, those whose gradients arrive last in backward (the first units') first."""
    return sorted(lifetimes.groups, key=lambda g: (g.update_unit, g.index))


@graph_pass(requires=("analysis:Lifetimes", "analysis:PlacementPlan", "analysis:ActivationPlan", "analysis:CostModel"),
            ensures=("analysis:PlacementPlan", "analysis:ActivationPlan"))
def plan_resident_groups(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    placement = ctx.get(PlacementPlan)
    lifetimes = ctx.get(Lifetimes)
    units = ctx.traced.units
    if ctx.resident_groups is not None:
        names = set(ctx.resident_groups)
        unknown = names - {g.name for g in lifetimes.groups}
        if unknown:
            raise RatelError(f"plan_resident_groups: no parameter group named {sorted(unknown)} in this program; "
                             "a later input shape must group parameters as the first did")
        if not names:
            return PassResult(gm, modified=False)
        chosen = with_resident(placement, lifetimes, units, names)
        return PassResult(gm, modified=False, analysis=(chosen, choose_activations(gm, ctx, chosen)))
    wanted = ctx.resident if ctx.resident is not None else ctx.device.startswith("cuda")
    if not wanted:
        return PassResult(gm, modified=False)

    def price(candidate: PlacementPlan, acts: ActivationPlan) -> tuple[float, bool]:
        """(predicted step seconds, whether the GPU and host budgets hold it)."""
        transfers = plan_transfers(ctx, candidate, lifetimes, acts)
        memory = simulate_memory(gm, ctx, acts, candidate)
        fits = memory.gpu_peak <= ctx.budget.gpu and memory.host_total <= ctx.budget.host
        return predict_times(ctx, transfers, acts, candidate).total, fits

    acts = ctx.get(ActivationPlan)
    best_seconds, fits = price(placement, acts)
    if not fits:
        return PassResult(gm, modified=False)     # verify_plan refuses the budget
    best, worse, resident_bytes = None, 0, 0
    names: set[str] = set()
    for group in candidates(lifetimes):
        resident_bytes += device_state_bytes(group, ctx.accumulate)
        if resident_bytes > ctx.budget.gpu:
            break
        names.add(group.name)
        candidate = with_resident(placement, lifetimes, units, names)
        candidate_acts = choose_activations(gm, ctx, candidate)
        # (a group whose compute copy was placed on SSD needs one in host memory again: the model's)
        seconds, fits = price(candidate, candidate_acts)
        if not fits:
            break
        if seconds < best_seconds * (1 - MIN_GAIN):
            best_seconds, best, worse = seconds, (candidate, candidate_acts), 0
        else:
            worse += 1
            if worse == 2:
                break
    if best is None:
        return PassResult(gm, modified=False)
    return PassResult(gm, modified=False, analysis=best)

