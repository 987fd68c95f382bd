"""build_lifetimes: when every tensor of a training step is made and read.

Stages:
  1. Group parameters: parameters of one dtype and trainability read by the same set of units share a flat
     buffer (a ``ParamGroup``). Tied weights (an embedding reused by the head) form a group of their own,
     read by both units, whose gradient is complete only after the earlier unit's backward.
  2. Lay out the timeline: the forward of each unit, then the backward of each unit in reverse.
  3. Record lifetimes, independent of placement (that is plan_placement's job):
       parameters       read at the forward and backward step of every user unit;
       gradients        produced at the backward of each user, complete at the lowest user;
       optimizer state  read and written when the gradient is complete;
       activations      every value crossing a unit boundary: made in the producer's forward, read by each
                        consumer's forward, and again by each consumer's backward (the recompute).
     Views are already resolved to their base by annotate_shapes; boundary values are measured by value.

Each record keeps the steps that make and read the tensor; ``first``/``last`` span them. Downstream:
plan_placement places the groups and boundary values, insert_releases frees a GPU-kept activation at its
``last`` read. Records are in timeline order, so iteration is deterministic.

Before / after: the graph is unchanged; the ``Lifetimes`` analysis holds the records, e.g.
``Lifetime(tensor="act:embedding", kind="activation", nbytes=2048, first=0, last=6, tier=gpu)``.
"""
from __future__ import annotations

import torch.fx as fx

from ratel.ir import (META_TENSOR, META_UNIT_CALL, CostModel, Lifetime, Lifetimes, ParamGroup, Tier, UnitCall,
                      step_index, timeline)
from ratel.passes.manager import PassContext, PassResult, graph_pass


def group_parameters(traced, units) -> tuple[ParamGroup, ...]:
    """Partition parameters by (reading units, dtype, trainable), in order of first use."""
    users: dict[str, list[int]] = {}
    for unit in units:
        for name in unit.params:
            users.setdefault(name, []).append(unit.index)
    keyed: dict[tuple, list[str]] = {}
    for name, readers in users.items():
        info = traced.param(name)
        keyed.setdefault((tuple(readers), info.dtype, info.trainable), []).append(name)
    ordered = sorted(keyed.items(), key=lambda kv: (kv[0][0][0], kv[0][0], not kv[0][2], str(kv[0][1])))
    groups = []
    for index, ((readers, dtype, trainable), names) in enumerate(ordered):
        shapes = tuple(traced.param(n).shape for n in names)
        offsets, total = [], 0
        for n in names:
            offsets.append(total)
            total += traced.param(n).numel
        label = "+".join(units[r].name for r in readers)
        if sum(1 for k in keyed if k[0] == readers) > 1:
            label += f":{str(dtype).replace('torch.', '')}" + ("" if trainable else ":frozen")
        elif not trainable:
            label += ":frozen"
        groups.append(ParamGroup(index=index, name=label, params=tuple(names), shapes=shapes,
                                 offsets=tuple(offsets), numel=total, dtype=dtype, users=readers,
                                 trainable=trainable))
    return tuple(groups)


def unit_calls(gm: fx.GraphModule) -> list[tuple[fx.Node, UnitCall]]:
    return [(n, n.meta[META_UNIT_CALL]) for n in gm.graph.nodes if META_UNIT_CALL in n.meta]


def boundary_values(gm: fx.GraphModule) -> dict[str, tuple[int, tuple[int, ...], int]]:
    """value name -> (producer unit or -1 for a user input, consumer units, bytes) for every unit input."""
    producer: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node.name != "runtime":
            producer[node.name] = -1
    consumers: dict[str, list[int]] = {}
    for node, call in unit_calls(gm):
        for value in call.inputs:
            consumers.setdefault(value, []).append(call.unit)
        for value in call.outputs:
            producer[value] = call.unit
    nodes = {n.name: n for n in gm.graph.nodes}
    out = {}
    for value, readers in consumers.items():
        meta = nodes[value].meta.get(META_TENSOR)
        out[value] = (producer[value], tuple(readers), meta.value_bytes if meta else 0)
    return out


@graph_pass(requires=("graph:outlined",), ensures=("analysis:Lifetimes",))
def build_lifetimes(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    units = ctx.traced.units
    steps = timeline(len(units))
    fwd_step, bwd_step = step_index(steps)
    groups = group_parameters(ctx.traced, units)

    records: list[Lifetime] = []

    def add(tensor: str, kind: str, nbytes: int, makes: list[int], reads: list[int], tier: Tier) -> None:
        span = makes + reads
        records.append(Lifetime(tensor, kind, nbytes, min(span), max(span), tier, tuple(makes), tuple(reads)))

    for group in groups:
        uses = sorted([fwd_step[u] for u in group.users] + [bwd_step[u] for u in group.users])
        add(f"param:{group.name}", "param", group.nbytes, [], uses, Tier.GPU)
        if group.trainable:
            grad_steps = sorted(bwd_step[u] for u in group.users)
            add(f"grad:{group.name}", "grad", group.nbytes, grad_steps, [bwd_step[group.update_unit]], Tier.GPU)
            add(f"optimizer_state:{group.name}", "optimizer_state", group.numel * 12, [bwd_step[group.update_unit]],
                [bwd_step[group.update_unit]], Tier.HOST)

    for value, (producer, consumers, nbytes) in boundary_values(gm).items():
        makes = [fwd_step[producer]] if producer >= 0 else [0]
        reads = sorted([fwd_step[c] for c in consumers] + [bwd_step[c] for c in consumers])
        add(f"act:{value}", "activation", nbytes, makes, reads, Tier.GPU)

    costs = ctx.analyses.get(CostModel)
    if costs is not None:
        for cost in costs.units:
            add(f"workspace:{units[cost.unit].name}:fwd", "workspace", cost.fwd_workspace,
                [fwd_step[cost.unit]], [], Tier.GPU)
            add(f"workspace:{units[cost.unit].name}:bwd", "workspace", cost.bwd_workspace,
                [bwd_step[cost.unit]], [], Tier.GPU)

    return PassResult(gm, modified=False,
                      analysis=Lifetimes(steps=steps, groups=groups, records=tuple(records)))

