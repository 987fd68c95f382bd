"""plan_placement: decide the tier of every tensor and the GPU parameter ring schedule.

The first policy (DESIGN.md, "Tiers and the cost model"):
  parameters       the compute copy lives in pinned host memory and is streamed into a GPU ring of
                   ``ctx.depth`` slots, one unit ahead of use, in forward and again in backward;
  gradients        leave for the host as each unit's backward finishes (no GPU residency beyond that);
  optimizer state  fp32 master, exp_avg, exp_avg_sq in host memory, updated by the CPU optimizer;
  activations      each unit's inputs are checkpointed to host and the unit is recomputed in backward,
                   except values kept on the GPU because moving them is pointless or costs more:
                   user inputs, values read by several units (fetched once instead of once per reader),
                   values too small to be worth a PCIe round trip (``HardwareProfile.min_offload_bytes``),
                   and the inputs of the last unit, whose backward follows its forward at once.

Stages:
  1. Tier per parameter group and optimizer state (host).
  2. Tier per boundary activation, with the reason.
  3. Ring schedule: consecutive steps of one unit share a residency (the last unit's forward and backward);
     residency k uses slot ``k % depth`` and is issued at the start of residency ``k-1``.
  4. Slot layout: the groups a unit reads, packed into one slot (256-byte aligned).

Before / after: the graph is unchanged; unit-output nodes gain ``node.meta["ratel.activation"]``::

    embedding = unit_embed[0]
  ->
    embedding = unit_embed[0]  # activation=host (2.00 KiB, unit input checkpoint)
"""
from __future__ import annotations

import torch.fx as fx

from ratel.ir import (META_ACTIVATION, ActivationPlacement, Lifetimes, ParamFetch, Phase, PlacementPlan,
                      SlotLayout, Tier)
from ratel.passes.build_lifetimes import boundary_values
from ratel.passes.manager import PassContext, PassResult, graph_pass

SLOT_ALIGN = 256


def _align(n: int) -> int:
    return (n + SLOT_ALIGN - 1) // SLOT_ALIGN * SLOT_ALIGN


def activation_tier(producer: int, consumers: tuple[int, ...], nbytes: int, num_units: int,
                    min_offload_bytes: int) -> tuple[Tier, str]:
    if producer < 0:
        return Tier.GPU, "user input"
    if len(consumers) > 1:
        return Tier.GPU, f"read by {len(consumers)} units"
    if nbytes < min_offload_bytes:
        return Tier.GPU, "small"
    if consumers[0] == num_units - 1:
        return Tier.GPU, "read again at the next step"
    return Tier.HOST, "unit input checkpoint"


def ring_schedule(steps, depth: int) -> tuple[ParamFetch, ...]:
    residencies: list[list[int]] = []      # [unit, first, last]
    for step in steps:
        if residencies and residencies[-1][0] == step.unit and residencies[-1][2] == step.index - 1:
            residencies[-1][2] = step.index
        else:
            residencies.append([step.unit, step.index, step.index])
    fetches = []
    for k, (unit, first, last) in enumerate(residencies):
        issue = residencies[k - 1][1] if k > 0 else first
        fetches.append(ParamFetch(unit=unit, slot=k % depth, issue=issue, first=first, last=last))
    return tuple(fetches)


def slot_layouts(units, groups) -> tuple[SlotLayout, ...]:
    layouts = []
    for unit in units:
        members = [g for g in groups if unit.index in g.users]
        offsets, total = [], 0
        for g in members:
            offsets.append(total)
            total = _align(total + g.nbytes)
        layouts.append(SlotLayout(unit=unit.index, groups=tuple(g.index for g in members),
                                  byte_offsets=tuple(offsets), nbytes=total))
    return tuple(layouts)


@graph_pass(requires=("analysis:Lifetimes",), ensures=("analysis:PlacementPlan", "meta:ratel.activation"))
def plan_placement(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    lifetimes = ctx.get(Lifetimes)
    units = ctx.traced.units
    if ctx.depth < 2:
        raise ValueError(f"depth={ctx.depth}: the parameter ring needs at least 2 slots to overlap copies")

    activations = []
    nodes = {n.name: n for n in gm.graph.nodes}
    for value, (producer, consumers, nbytes) in boundary_values(gm).items():
        tier, reason = activation_tier(producer, consumers, nbytes, len(units), ctx.hardware.min_offload_bytes)
        record = ActivationPlacement(value=value, producer=producer, consumers=consumers, nbytes=nbytes,
                                     tier=tier, reason=reason)
        nodes[value].meta[META_ACTIVATION] = record
        activations.append(record)

    layouts = slot_layouts(units, lifetimes.groups)
    plan = PlacementPlan(
        param_tier=tuple((g.name, Tier.HOST) for g in lifetimes.groups),
        optimizer_tier=tuple((g.name, Tier.HOST) for g in lifetimes.groups if g.trainable),
        activations=tuple(activations),
        fetches=ring_schedule(lifetimes.steps, ctx.depth),
        layouts=layouts,
        depth=ctx.depth,
        slot_bytes=max((layout.nbytes for layout in layouts), default=0),
    )
    return PassResult(gm, modified=False, analysis=plan)


def forward_steps(lifetimes: Lifetimes) -> dict[int, int]:
    return {s.unit: s.index for s in lifetimes.steps if s.phase == Phase.FWD}


def backward_steps(lifetimes: Lifetimes) -> dict[int, int]:
    return {s.unit: s.index for s in lifetimes.steps if s.phase == Phase.BWD}
