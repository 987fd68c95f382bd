"""plan_placement: decide the tier of every tensor and the GPU parameter ring schedule.

The first policy (docs/architecture.md, "Tiers and the cost model"):
  parameters       the compute copy lives in pinned host memory and is streamed into a GPU ring of
                   ``ctx.depth`` slots, one unit ahead of use, in forward and again in backward; when host
                   memory cannot hold it even with every optimizer state on SSD, the largest groups' copies
                   go to SSD too, read back ahead of each fetch;
  gradients        leave for the host as each unit's backward finishes (no GPU residency beyond that);
  optimizer state  fp32 master, exp_avg, exp_avg_sq in host memory, updated by the CPU optimizer; when
                   they do not fit in ``Budget.host``, the states of the groups updated earliest in backward
                   go to SSD (read ahead of their update, written back after it);
  activations      each unit's inputs are checkpointed to host and the unit is recomputed in backward,
                   except values kept on the GPU because moving them is pointless or costs more:
                   user inputs, values read by several units (fetched once instead of once per reader),
                   values too small to be worth a PCIe round trip (``HardwareProfile.min_offload_bytes``),
                   and the inputs of the last unit, whose backward follows its forward at once;
  saved values     a fixed activation policy that moves every saved value ("host", "ssd") gets the host memory
                   it needs set aside before states and copies are placed (all of it for "host", the SSD
                   staging regions for "ssd"); "auto" fits its choices into what placement leaves.

Stages:
  1. Tier per parameter group (host) and optimizer state (host, or SSD beyond the host budget).
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

import torch

from ratel.ir import (META_ACTIVATION, ActivationPlacement, CostModel, Lifetimes, ParamFetch, PlacementPlan,
                      SlotLayout, Tier)
from ratel.ir.layout import SLOT_ALIGN, host_usage, page, pool_bytes, round_up, saved_staging_bytes
from ratel.passes.build_lifetimes import boundary_values
from ratel.passes.manager import PassContext, PassResult, graph_pass

def saved_reserve(policy: str, costs: CostModel, ssd_ok: bool) -> int:
    """Host bytes a fixed policy's saved values will take, as ``saved_host_bytes`` prices its plan."""
    if policy == "host" or (policy == "ssd" and not ssd_ok):
        return pool_bytes(v.nbytes for unit in costs.units for v in unit.saved)
    if policy == "ssd":
        return saved_staging_bytes(max((sum(page(v.nbytes) for v in unit.saved) for unit in costs.units), default=0))
    return 0


def optimizer_tiers(groups, activations, budget, torch_adam: bool, accumulate: int = 1,
                    reserved: int = 0, clip: bool = False, ranks: int = 1) -> dict[str, Tier]:
    """Optimizer states on the host while they fit, the rest on SSD.

    Groups updated last in backward (the embedding, the first blocks) keep their states on the host: their
    update is what the next forward waits for. Groups updated early have the rest of the backward to read
    their states from SSD and write them back.
    """
    trainable = [g for g in groups if g.trainable]
    tiers = {g.name: Tier.HOST for g in trainable}

    def fits(t):
        return sum(b for _, b in host_usage(groups, t, activations, torch_adam, accumulate=accumulate,
                                            clip=clip, ranks=ranks)) + reserved \
            <= budget.host

    if fits(tiers):
        return tiers
    if not budget.ssd_dir:
        return tiers    # verify_plan refuses it, naming the host memory needed or an ssd_dir
    tiers = {g.name: Tier.SSD for g in trainable}
    for g in sorted(trainable, key=lambda g: (g.update_unit, g.index)):
        trial = {**tiers, g.name: Tier.HOST}
        if fits(trial):
            tiers = trial
    return tiers


def param_tiers(groups, optimizer_tier: dict[str, Tier], activations, budget, torch_adam: bool,
                accumulate: int = 1, reserved: int = 0, clip: bool = False, ranks: int = 1) -> dict[str, Tier]:
    """Parameter compute copies on the host, unless even with every optimizer state on SSD the host is short:
    then, largest group first, copies move to SSD (read back before every fetch: the last resort). Groups that
    compute in fp32 stay: their compute copy is their master."""
    tiers = {g.name: Tier.HOST for g in groups}

    def fits(t):
        return sum(b for _, b in host_usage(groups, optimizer_tier, activations, torch_adam, t,
                                            accumulate=accumulate, clip=clip, ranks=ranks)) + reserved <= budget.host

    if fits(tiers) or not budget.ssd_dir:
        return tiers
    movable = [g for g in groups if g.dtype != torch.float32 and (not g.trainable or optimizer_tier[g.name] == Tier.SSD)]
    for g in sorted(movable, key=lambda g: (-g.nbytes, g.index)):
        tiers[g.name] = Tier.SSD
        if fits(tiers):
            break
    return tiers


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
            total = round_up(total + g.nbytes, SLOT_ALIGN)
        layouts.append(SlotLayout(unit=unit.index, groups=tuple(g.index for g in members),
                                  byte_offsets=tuple(offsets), nbytes=total))
    return tuple(layouts)


@graph_pass(requires=("analysis:Lifetimes", "analysis:CostModel"), ensures=("analysis:PlacementPlan", "meta:ratel.activation"))
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
    reserved = saved_reserve(ctx.activation_policy, ctx.get(CostModel), bool(ctx.budget.ssd_dir))
    tiers = optimizer_tiers(lifetimes.groups, activations, ctx.budget, ctx.hardware.torch_cpu_adam, ctx.accumulate,
                            reserved, ctx.clip, ctx.ranks)
    params = param_tiers(lifetimes.groups, tiers, activations, ctx.budget, ctx.hardware.torch_cpu_adam, ctx.accumulate,
                         reserved, ctx.clip, ctx.ranks)
    plan = PlacementPlan(
        param_tier=tuple((g.name, params[g.name]) for g in lifetimes.groups),
        optimizer_tier=tuple((g.name, tiers[g.name]) for g in lifetimes.groups if g.trainable),
        activations=tuple(activations),
        fetches=ring_schedule(lifetimes.steps, ctx.depth),
        layouts=layouts,
        depth=ctx.depth,
        slot_bytes=max((layout.nbytes for layout in layouts), default=0),
    )
    return PassResult(gm, modified=False, analysis=plan)
