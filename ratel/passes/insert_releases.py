"""insert_releases: free every GPU copy right after its last use (a pass of its own, after planning).

Stages:
  1. Parameters: after the last step of each ring residency, ``release_params`` lets the slot be
     overwritten once the compute issued so far is done (forward: a graph node after the unit and its
     activation copies; backward: a ``release_params`` record at that step).
  2. Activations: a value kept on the GPU is released after the backward of its earliest consumer (the
     last to read it); a value fetched back from host is released after the backward that read it. In
     forward, the graph drops its reference after the last reader (fx code generation clears dead
     variables), so a value checkpointed to host leaves the GPU once its copy is done.

Before / after::

    offload_activation = ratel.offload_activation(runtime, 'add_2', add_2)
  ->
    offload_activation = ratel.offload_activation(runtime, 'add_2', add_2)
    release_params = ratel.release_params(runtime, 'blocks.0')  # release_params gpu step=1 needed_by=1
"""
from __future__ import annotations

import torch.fx as fx

from ratel.ir import (META_PROVENANCE, META_TRANSFER, Lifetimes, PlacementPlan, Provenance, Schedule, Tier, Transfer,
                      TransferKind as K, schedule_order, step_index)
from ratel.passes.build_lifetimes import unit_calls
from ratel.passes.manager import PassContext, PassResult, graph_pass
from ratel.ir import ops


@graph_pass(requires=("analysis:Lifetimes", "analysis:PlacementPlan", "analysis:Schedule"),
            ensures=("analysis:Schedule", "graph:releases"))
def insert_releases(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    plan = ctx.get(PlacementPlan)
    lifetimes = ctx.get(Lifetimes)
    schedule = ctx.get(Schedule)
    units = ctx.traced.units
    fwd, bwd = step_index(lifetimes.steps)
    graph = gm.graph
    runtime = next(n for n in graph.nodes if n.op == "placeholder" and n.name == "runtime")
    releases: list[Transfer] = []

    for call_node, call in unit_calls(gm):
        step = fwd[call.unit]
        fetch = plan.fetch_at(step)
        if fetch.last != step:
            continue
        anchor = call_node
        while anchor.next.op == "call_function" and (
                anchor.next.args[:1] == (call_node,) or
                anchor.next.target in (ops.offload_activation, ops.keep_activation)):
            anchor = anchor.next
        transfer = Transfer(K.RELEASE_PARAMS, call.name, plan.layouts[call.unit].nbytes, Tier.GPU, None,
                            step=step, needed_by=step, slot=fetch.slot, unit=call.unit)
        releases.append(transfer)
        with graph.inserting_after(anchor):
            node = graph.call_function(ops.release_params, (runtime, call.name))
        node.meta[META_TRANSFER] = transfer
        node.meta[META_PROVENANCE] = Provenance("insert_releases", "release_params", "end of residency")

    for fetch in plan.fetches:
        if fetch.last >= len(units):
            releases.append(Transfer(K.RELEASE_PARAMS, units[fetch.unit].name, plan.layouts[fetch.unit].nbytes,
                                     Tier.GPU, None, step=fetch.last, needed_by=fetch.last, slot=fetch.slot,
                                     unit=fetch.unit))
    for act in plan.activations:
        last_read = lifetimes.get(f"act:{act.value}").last    # the backward of its earliest consumer
        if act.tier == Tier.GPU:
            releases.append(Transfer(K.RELEASE_ACTIVATION, act.value, act.nbytes, Tier.GPU, None,
                                     step=last_read, needed_by=last_read, value=act.value))
        else:
            for consumer in sorted(act.consumers, reverse=True):
                releases.append(Transfer(K.RELEASE_ACTIVATION, act.value, act.nbytes, Tier.GPU, None,
                                         step=bwd[consumer], needed_by=bwd[consumer], value=act.value))
    gm.recompile()
    ordered = schedule_order(schedule.transfers + tuple(releases))
    return PassResult(gm, modified=True, analysis=Schedule(transfers=ordered))
