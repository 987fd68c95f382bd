"""insert_transfers: turn the placement plan into copy operations on the timeline.

Stages:
  1. Forward, as graph nodes around each ``run_unit``: ``prefetch_params`` for every ring residency
     issued at this step (the current unit's first, so it is not queued behind the next one), then
     ``wait_params``; after the unit, ``offload_activation`` for each output checkpointed to host and
     ``keep_activation`` for each output kept on the GPU (user inputs are kept before the first unit).
  2. Backward, as ``Transfer`` records the runtime executes from the unit's backward (autograd drives the
     backward, so it has no graph of its own): ``fetch_params`` one residency ahead, ``fetch_activation``
     one step ahead of the recompute that reads it, ``flush_grads`` when the unit's backward is done, and
     ``optimizer_step`` for each group whose gradient is then complete.
  3. SSD-resident optimizer states: ``ssd_read_states`` ahead of each update, ``ssd_write_states`` after it
     (the runtime's SSD lane issues them in this order, reads on their own channel).
  4. Saved activations (plan_activations): ``offload_saved`` (and ``ssd_write_saved``) in the unit's forward,
     ``ssd_read_saved`` and ``fetch_saved`` one step before its backward.

Before / after::

    unit_blocks_0 = ratel.run_unit(runtime, 'blocks.0', embedding)
    add_2 = unit_blocks_0[0]
  ->
    prefetch_params = ratel.prefetch_params(runtime, 'blocks.1', 1)  # fetch_params host->gpu ... slot=1
    wait_params = ratel.wait_params(runtime, 'blocks.0')
    unit_blocks_0 = ratel.run_unit(runtime, 'blocks.0', embedding)
    add_2 = unit_blocks_0[0]
    offload_activation = ratel.offload_activation(runtime, 'add_2', add_2)  # offload_activation gpu->host
"""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from ratel.ir import (META_PROVENANCE, META_TRANSFER, ActivationPlan, Lifetimes, Phase, PlacementPlan, Provenance,
                      Schedule, Tier, Transfer, TransferKind as K, schedule_order, step_index)
from ratel.ir.layout import landing_bytes, ssd_staging_slots, ssd_state_bytes, ssd_state_pieces
from ratel.passes.build_lifetimes import unit_calls
from ratel.passes.manager import PassContext, PassResult, graph_pass
from ratel.ir import ops


def _insert(graph: fx.Graph, fn, args, transfer: Transfer | None, reason: str) -> fx.Node:
    node = graph.call_function(fn, args)
    if transfer is not None:
        node.meta[META_TRANSFER] = transfer
    node.meta[META_PROVENANCE] = Provenance("insert_transfers", fn.__name__, reason)
    return node


def last_output_node(call_node: fx.Node) -> fx.Node:
    """The last getitem reading a run_unit node (they directly follow it), or the call itself."""
    last = call_node
    for user in call_node.users:
        if user.op == "call_function" and user.args[0] is call_node and last < user:
            last = user
    return last


def unit_bytes(plan: PlacementPlan, unit: int) -> int:
    return plan.layouts[unit].nbytes


def plan_transfers(ctx: PassContext, plan: PlacementPlan, lifetimes: Lifetimes,
                   acts: ActivationPlan | None) -> list[Transfer]:
    """Every movement of one step, in issue order (pure: plan_activations prices candidates with it)."""
    units = ctx.traced.units
    steps = lifetimes.steps
    bwd = step_index(steps)[1]
    num_units = len(units)
    out: list[Transfer] = []
    ssd_reads = ssd_param_reads(ctx, lifetimes, plan)
    for step in steps:
        t = step.index
        unit = units[step.unit]
        issued = [(k, f) for k, f in enumerate(plan.fetches) if f.issue == t]
        for k, fetch in sorted(issued, key=lambda kf: kf[1].first):
            # SSD-resident parameters: each residency's read is issued right after the previous fetch (the
            # first with its own fetch), so the ring holds one read ahead.
            if k == 0 and k in ssd_reads:
                out.append(dataclasses.replace(ssd_reads[k], step=t))
            out.append(Transfer(K.FETCH_PARAMS, units[fetch.unit].name, unit_bytes(plan, fetch.unit), Tier.HOST,
                                Tier.GPU, step=t, needed_by=fetch.first, slot=fetch.slot, unit=fetch.unit))
            if k + 1 in ssd_reads:
                out.append(dataclasses.replace(ssd_reads[k + 1], step=t))
        if step.phase == Phase.FWD:
            for act in plan.activations:
                if act.producer == step.unit and act.tier == Tier.HOST:
                    out.append(Transfer(K.OFFLOAD_ACTIVATION, act.value, act.nbytes, Tier.GPU, Tier.HOST, step=t,
                                        needed_by=bwd[min(act.consumers)], value=act.value))
            out.extend(_saved_out(acts, step.unit, unit.name, t, bwd[step.unit]))
            continue
        for act in plan.activations:
            if act.tier == Tier.HOST:
                for consumer in act.consumers:
                    if max(bwd[consumer] - 1, num_units) == t:
                        out.append(Transfer(K.FETCH_ACTIVATION, act.value, act.nbytes, Tier.HOST, Tier.GPU, step=t,
                                            needed_by=bwd[consumer], value=act.value))
        # Saved values are read from SSD two steps ahead of their backward and fetched to the GPU one ahead.
        if t == num_units:
            out.extend(_saved_in(acts, step.unit, unit.name, t, t, fetch=True, read=True))
            if step.unit > 0:
                out.extend(_saved_in(acts, step.unit - 1, units[step.unit - 1].name, t, t + 1, fetch=False, read=True))
        if step.unit > 0:
            out.extend(_saved_in(acts, step.unit - 1, units[step.unit - 1].name, t, t + 1, fetch=True, read=False))
        if step.unit > 1:
            out.extend(_saved_in(acts, step.unit - 2, units[step.unit - 2].name, t, t + 2, fetch=False, read=True))
        trainable = [g for g in lifetimes.groups if g.trainable and step.unit in g.users]
        streamed = [g for g in trainable if not plan.on_gpu(g.name)]
        if streamed:
            # (with ranks, each rank's slice of the gradients: they are reduce-scattered among the GPUs first)
            out.append(Transfer(K.FLUSH_GRADS, unit.name, sum(landing_bytes(g, ctx.ranks) for g in streamed),
                                Tier.GPU, Tier.HOST, step=t, needed_by=t, unit=step.unit))
        for group in trainable:
            if group.update_unit == step.unit and not ctx.clip:
                out.extend(_updates(plan, group, t, len(steps)))
    if ctx.clip:
        # Clipping needs the global norm: every update waits for the last gradient, then runs in forward order.
        for group in sorted((g for g in lifetimes.groups if g.trainable), key=lambda g: (g.update_unit, g.index)):
            out.extend(_updates(plan, group, len(steps) - 1, len(steps)))
    out.extend(ssd_transfers(lifetimes, plan, bwd, len(steps), ctx.clip))
    out.extend(ssd_param_writes(lifetimes, plan, bwd, len(steps)))
    return list(schedule_order(out))


def _updates(plan: PlacementPlan, group, step: int, num_steps: int) -> list[Transfer]:
    """A group's update: by the CPU optimizer, or on the GPU for a group resident there, whose new weights are
    then copied to the host copy the model object's parameters alias."""
    if not plan.on_gpu(group.name):
        return [_optimizer_step(group, step, num_steps)]
    return [Transfer(K.GPU_STEP, group.name, gpu_step_bytes(group), Tier.GPU, Tier.GPU, step=step,
                     needed_by=num_steps, group=group.index, elements=group.numel),
            Transfer(K.WRITE_BACK_PARAMS, group.name, group.nbytes, Tier.GPU, Tier.HOST, step=step,
                     needed_by=num_steps, group=group.index)]


def gpu_step_bytes(group) -> int:
    """HBM bytes of an update on the GPU: torch's fused AdamW reads master, gradient and moments (fp32) and
    writes master and moments; a low-precision group also widens its gradient and rounds the new master."""
    extra = 0 if group.dtype == torch.float32 else 2 * (group.dtype.itemsize + 4)
    return group.numel * (28 + extra)


def _optimizer_step(group, step: int, num_steps: int) -> Transfer:
    # nbytes: the bytes one update moves through host memory (master, m, v read and written; 16 B/param)
    return Transfer(K.OPTIMIZER_STEP, group.name, group.numel * 16, Tier.HOST, Tier.HOST, step=step,
                    needed_by=num_steps, group=group.index, elements=group.numel)


def ssd_param_reads(ctx, lifetimes: Lifetimes, plan: PlacementPlan) -> dict[int, Transfer]:
    """Residency k -> the SSD read of its SSD-resident parameter groups (issued with the fetch before it)."""
    units = ctx.traced.units
    on_ssd = {g.index: g for g in lifetimes.groups if plan.param_tier_of(g.name) == Tier.SSD}
    out = {}
    for k, fetch in enumerate(plan.fetches):
        groups = [on_ssd[i] for i in plan.layouts[fetch.unit].groups if i in on_ssd]
        if groups:
            out[k] = Transfer(K.SSD_READ_PARAMS, units[fetch.unit].name, sum(g.nbytes for g in groups), Tier.SSD,
                              Tier.HOST, step=0, needed_by=fetch.issue, slot=fetch.slot, unit=fetch.unit)
    return out


def ssd_param_writes(lifetimes: Lifetimes, plan: PlacementPlan, bwd: dict[int, int],
                     num_steps: int) -> list[Transfer]:
    """Trainable parameter groups on SSD are written back after their update."""
    return [Transfer(K.SSD_WRITE_PARAMS, g.name, g.nbytes, Tier.HOST, Tier.SSD, step=bwd[g.update_unit],
                     needed_by=num_steps, group=g.index)
            for g in lifetimes.groups if g.trainable and plan.param_tier_of(g.name) == Tier.SSD]


def _saved_out(acts, unit: int, name: str, step: int, needed_by: int) -> list[Transfer]:
    if acts is None or acts.of(unit).mode != "saved":
        return []
    out = []
    for d in acts.of(unit).decisions:
        if d.tier in (Tier.HOST, Tier.SSD):
            out.append(Transfer(K.OFFLOAD_SAVED, f"{name}/{d.key}", d.nbytes, Tier.GPU, Tier.HOST, step=step,
                                needed_by=needed_by, unit=unit, value=d.key))
        if d.tier == Tier.SSD:
            out.append(Transfer(K.SSD_WRITE_SAVED, f"{name}/{d.key}", d.nbytes, Tier.HOST, Tier.SSD, step=step,
                                needed_by=needed_by, unit=unit, value=d.key))
    return out


def _saved_in(acts, unit: int, name: str, step: int, needed_by: int, fetch: bool, read: bool) -> list[Transfer]:
    if acts is None or acts.of(unit).mode != "saved":
        return []
    out = []
    for d in acts.of(unit).decisions:
        if read and d.tier == Tier.SSD:
            out.append(Transfer(K.SSD_READ_SAVED, f"{name}/{d.key}", d.nbytes, Tier.SSD, Tier.HOST, step=step,
                                needed_by=needed_by, unit=unit, value=d.key))
        if fetch and d.tier in (Tier.HOST, Tier.SSD):
            out.append(Transfer(K.FETCH_SAVED, f"{name}/{d.key}", d.nbytes, Tier.HOST, Tier.GPU, step=step,
                                needed_by=needed_by, unit=unit, value=d.key))
    return out


@graph_pass(requires=("analysis:Lifetimes", "analysis:PlacementPlan", "analysis:ActivationPlan"),
            ensures=("analysis:Schedule", "graph:transfers"))
def insert_transfers(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    plan = ctx.get(PlacementPlan)
    lifetimes = ctx.get(Lifetimes)
    transfers = plan_transfers(ctx, plan, lifetimes, ctx.get(ActivationPlan))
    fwd = step_index(lifetimes.steps)[0]
    graph = gm.graph
    runtime = next(n for n in graph.nodes if n.op == "placeholder" and n.name == "runtime")
    values = {n.name: n for n in graph.nodes}
    calls = unit_calls(gm)
    for act in plan.activations:
        if act.producer < 0:
            with graph.inserting_before(calls[0][0]):
                _insert(graph, ops.keep_activation, (runtime, act.value, values[act.value]), None, act.reason)
    offloads = {t.subject: t for t in transfers if t.kind == K.OFFLOAD_ACTIVATION}
    for call_node, call in calls:
        step = fwd[call.unit]
        with graph.inserting_before(call_node):
            for transfer in (t for t in transfers if t.step == step and t.kind == K.FETCH_PARAMS):
                _insert(graph, ops.prefetch_params, (runtime, transfer.subject, transfer.slot), transfer,
                        "one residency ahead")
            _insert(graph, ops.wait_params, (runtime, call.name), None, "parameters needed now")
        anchor = last_output_node(call_node)
        for act in plan.activations:
            if act.producer != call.unit:
                continue
            transfer = offloads.get(act.value)
            fn = ops.offload_activation if transfer is not None else ops.keep_activation
            with graph.inserting_after(anchor):
                anchor = _insert(graph, fn, (runtime, act.value, values[act.value]), transfer, act.reason)
    gm.recompile()
    return PassResult(gm, modified=True, analysis=Schedule(transfers=tuple(transfers)))


def ssd_transfers(lifetimes: Lifetimes, plan: PlacementPlan, bwd: dict[int, int], num_steps: int,
                  clip: bool = False) -> list[Transfer]:
    """Optimizer states on SSD, in update order: the first reads start with the forward, each later read when
    the update one or two groups earlier finishes (a ring of staging buffers), and each write-back after its
    update.
    With clipping every update runs after the backward, in forward order."""
    sign = 1 if clip else -1
    ssd = sorted((g for g in lifetimes.groups if g.trainable and plan.optimizer_tier_of(g.name) == Tier.SSD),
                 key=lambda g: (sign * g.update_unit, g.index))
    # The ring stages pieces (ir/layout.ssd_state_pieces): groups of one piece are read two ahead; a group of
    # several streams through the ring while the group before it updates.
    whole_groups = all(len(ssd_state_pieces(g)) == 1 for g in ssd)
    ahead = max(1, ssd_staging_slots(ssd) - 1) if whole_groups else 1
    out = []
    for k, g in enumerate(ssd):
        update = num_steps - 1 if clip else bwd[g.update_unit]
        issue = 0 if k < ahead else (num_steps - 1 if clip else bwd[ssd[k - ahead].update_unit])
        out.append(Transfer(K.SSD_READ_STATES, g.name, ssd_state_bytes(g), Tier.SSD, Tier.HOST, step=issue,
                            needed_by=update, group=g.index))
        out.append(Transfer(K.SSD_WRITE_STATES, g.name, ssd_state_bytes(g), Tier.HOST, Tier.SSD, step=update,
                            needed_by=num_steps, group=g.index))
    return out
