"""Simulation shared by the planning passes: GPU and host memory step by step, and step time per lane.

Not a pass: plan_activations evaluates candidate plans with it, verify_plan checks the final one.
"""
from __future__ import annotations

import bisect
import math

import torch.fx as fx

from ratel.ir import (META_TENSOR, ActivationPlan, CostModel, Lifetimes, MemoryProfile, Phase, PlacementPlan, Span,
                      StepMemory, StepTime, Tier, TimeProfile, TransferKind as K, UnitActivations, UnitCost,
                      step_index)
from ratel.passes.build_lifetimes import boundary_values, unit_calls
from ratel.passes.manager import PassContext
from ratel.ir.layout import (SLOT_ALIGN, device_exchange_bytes, device_state_bytes, device_update_scratch_bytes,
                             exchange_bytes, grad_ring_slots, host_updated, host_usage, round_up, saved_host_bytes,
                             scatter_bytes, ssd_state_bytes)


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


# cuBLAS keeps a workspace per stream it runs on, allocated at its first product there and held for the
# process: 32 MiB on Hopper by default (CUBLAS_WORKSPACE_CONFIG ":4096:8"). Measured on the H200: a fresh
# process training a 12-layer Llama under a 52.5 MB budget peaked 33.5 MB higher than the same run after
# other engines had used the streams.
CUBLAS_WORKSPACE = 32 << 20


def _add_intervals(totals: list[int], intervals, nbytes: int, skip: int | None = None) -> None:
    """Add ``nbytes`` to every step covered by the union of closed ``intervals``, except step ``skip``."""
    covered = set()
    for first, last in intervals:
        covered.update(range(max(first, 0), min(last, len(totals) - 1) + 1))
    covered.discard(skip)
    for t in covered:
        totals[t] += nbytes


def _boundary_bytes_by_step(activations, fwd: dict, bwd: dict, num_steps: int) -> list[int]:
    """GPU bytes of unit-boundary activations at each step: on the GPU from their producer's forward to
    their first consumer's backward; otherwise until their last consumer's forward and around each
    consumer's backward (fetched the step before). The producer's own forward counts them in its workspace."""
    totals = [0] * num_steps
    for act in activations:
        produced = fwd[act.producer] if act.producer >= 0 else 0
        if act.tier == Tier.GPU:
            intervals = [(produced, bwd[min(act.consumers)])]
        else:
            intervals = [(produced, max(fwd[c] for c in act.consumers))]
            intervals += [(bwd[c] - 1, bwd[c]) for c in act.consumers]
        _add_intervals(totals, intervals, act.nbytes, skip=fwd.get(act.producer) if act.producer >= 0 else None)
    return totals


def _saved_bytes_by_step(acts: ActivationPlan | None, units, fwd: dict, bwd: dict, num_steps: int) -> list[int]:
    """GPU bytes of saved-mode units' saved values at each step: kept values from the unit's forward to its
    backward; swapped ones while their copy out runs (the next step) and from the step before their backward
    (prefetch); recomputed ones during its backward. The unit's own forward holds them in its workspace."""
    totals = [0] * num_steps
    if acts is None:
        return totals
    for u in units:
        plan = acts.of(u.index)
        if plan.mode != "saved":
            continue
        f, b = fwd[u.index], bwd[u.index]
        _add_intervals(totals, [(f + 1, b)], plan.bytes_on(Tier.GPU), skip=f)
        _add_intervals(totals, [(f + 1, f + 1), (b - 1, b)], plan.bytes_on(Tier.HOST) + plan.bytes_on(Tier.SSD),
                       skip=f)
        _add_intervals(totals, [(b, b)], plan.bytes_on(None), skip=f)
    return totals


def simulate_memory(gm: fx.GraphModule, ctx: PassContext, acts: ActivationPlan | None = None,
                    placement: PlacementPlan | None = None) -> MemoryProfile:
    """GPU bytes at every step and the host and SSD totals of a plan (``placement``: a candidate's, else the
    context's)."""
    acts = acts if acts is not None else ctx.analyses.get(ActivationPlan)
    placement = placement if placement is not None else ctx.get(PlacementPlan)
    lifetimes = ctx.get(Lifetimes)
    costs = {c.unit: c for c in ctx.get(CostModel).units}
    steps = lifetimes.steps
    fwd, bwd = step_index(steps)
    boundary = boundary_values(gm)
    ring = placement.depth * placement.slot_bytes
    resident = resident_buffer_bytes(gm)
    library = CUBLAS_WORKSPACE if ctx.device.startswith("cuda") else 0
    user_outputs = _user_outputs(gm, boundary)
    grad_bytes = {u.index: sum(g.nbytes for g in lifetimes.groups if g.trainable and u.index in g.users)
                  for u in ctx.traced.units}
    # A group read by several units accumulates its gradient on the GPU from its first backward to its last.
    shared = [(bwd[max(g.users)], bwd[min(g.users)], g.nbytes) for g in lifetimes.groups
              if g.trainable and len(g.users) > 1]
    # Groups resident on the GPU hold their weights and states all along; each update there needs an fp32
    # gradient while it runs, and with clipping their gradients wait for the global norm at the last step.
    on_gpu = [g for g in lifetimes.groups if placement.on_gpu(g.name)]
    resident_weights = sum(round_up(g.nbytes, SLOT_ALIGN) for g in on_gpu)
    resident_states = sum(device_state_bytes(g, ctx.accumulate) for g in on_gpu) - resident_weights
    last = len(steps) - 1
    update_scratch = [0] * len(steps)
    for g in on_gpu:
        if g.trainable:
            at = last if ctx.clip else bwd[g.update_unit]
            update_scratch[at] = max(update_scratch[at], device_update_scratch_bytes(g))
            if ctx.clip:
                shared.append((bwd[g.update_unit] + 1, last, g.nbytes))

    boundary_at = _boundary_bytes_by_step(placement.activations, fwd, bwd, len(steps))
    saved_at = _saved_bytes_by_step(acts, ctx.traced.units, fwd, bwd, len(steps))
    profile = []
    for step in steps:
        t = step.index
        boundary_acts = boundary_at[t]
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
            # The unit's flat gradient buffer fills during its own backward (autograd's per-parameter
            # gradients, in the workspace, are copied into it); the previous unit's is still copying out.
            in_flight = grad_bytes[step.unit] + (grad_bytes[previous.unit] if previous.phase == Phase.BWD else 0)
        accumulating = sum(b for first, last, b in shared if first <= t <= last)
        saved = saved_at[t]
        parts = (("param ring", ring), ("resident buffers", resident), ("cuBLAS workspace", library),
                 ("resident parameters", resident_weights), ("resident optimizer states", resident_states),
                 ("optimizer updates on the GPU", update_scratch[t]),
                 ("activations", boundary_acts),
                 ("saved activations", saved),
                 ("unit workspace", workspace), ("gradients in flight", in_flight),
                 ("shared gradients", accumulating), ("user outputs", held))
        profile.append(StepMemory(step=t, gpu=sum(b for _, b in parts), breakdown=parts))
    peak = max(profile, key=lambda s: s.gpu)

    host = host_usage(lifetimes.groups, dict(placement.optimizer_tier), placement.activations, ctx.hardware.torch_cpu_adam,
                      dict(placement.param_tier), accumulate=ctx.accumulate, clip=ctx.clip, ranks=ctx.ranks)
    ssd_total = sum(ssd_state_bytes(g) for g in lifetimes.groups
                    if g.trainable and placement.optimizer_tier_of(g.name) == Tier.SSD)
    ssd_total += sum(g.nbytes for g in lifetimes.groups if placement.param_tier_of(g.name) == Tier.SSD)
    if acts is not None:
        swapped, staging = saved_host_bytes(acts)
        if swapped:
            host = host + (("saved activations (pinned)", swapped),)
        if staging:
            host = host + (("saved activations SSD staging (pinned)", staging),)
        ssd_total += sum(d.nbytes for u in acts.units for d in u.decisions if d.tier == Tier.SSD)
    return MemoryProfile(steps=tuple(profile), gpu_peak=peak.gpu, gpu_peak_step=peak.step,
                         host_bytes=host, host_total=sum(b for _, b in host), ssd_total=ssd_total)


# What each transfer kind moves, so that dependencies match like with like (a unit and a group share names).
_MOVES = {K.FETCH_PARAMS: "params", K.SSD_READ_PARAMS: "params", K.SSD_WRITE_PARAMS: "params",
          K.OFFLOAD_ACTIVATION: "activation", K.FETCH_ACTIVATION: "activation",
          K.OFFLOAD_SAVED: "saved", K.SSD_WRITE_SAVED: "saved", K.SSD_READ_SAVED: "saved", K.FETCH_SAVED: "saved",
          K.FLUSH_GRADS: "grads", K.OPTIMIZER_STEP: "states", K.SSD_READ_STATES: "states",
          K.SSD_WRITE_STATES: "states", K.GPU_STEP: "states", K.WRITE_BACK_PARAMS: "params"}
_H2D_LABEL = {K.FETCH_PARAMS: "params", K.FETCH_ACTIVATION: "activation", K.FETCH_SAVED: "saved"}
_D2H_LABEL = {K.OFFLOAD_ACTIVATION: "offload", K.FLUSH_GRADS: "flush", K.OFFLOAD_SAVED: "offload",
              K.WRITE_BACK_PARAMS: "write back"}


def what(kind: K) -> str:
    return _MOVES[kind]


def ssd_bytes_moved(transfers) -> tuple[int, int]:
    """(bytes read, bytes written) on the SSD lane by these transfers: one step's, for a plan's."""
    read = sum(t.nbytes for t in transfers if t.lane == "ssd" and t.kind.spec.dst == Tier.HOST)
    written = sum(t.nbytes for t in transfers if t.lane == "ssd" and t.kind.spec.src == Tier.HOST)
    return read, written


def _ssd_rate(transfers, hw) -> float:
    """Bytes per second of the SSD lane for this plan's mix of reads and writes. Its two channels run side
    by side, so the lane moves the step's bytes in max(read / read rate, written / write rate, both / both
    rate) — the roofline measured SSD-bound steps run at 0.85-1.0 of (benchmarks/RESULTS.md); the lane is
    simulated as one queue at the rate that gives that time."""
    read, written = ssd_bytes_moved(transfers)
    if not read and not written:
        return hw.ssd_read_gbps * 1e9
    seconds = max(read / (hw.ssd_read_gbps * 1e9), written / (hw.ssd_write_gbps * 1e9),
                  (read + written) / (hw.ssd_both_gbps * 1e9) if read and written else 0.0)
    return (read + written) / seconds


def compute_seconds(cost: UnitCost, phase: Phase, saved: UnitActivations | None, rate: float) -> float:
    """Seconds of one unit's compute in one step. ``saved``: the unit's plan when its forward keeps saved
    values (None: the unit is checkpointed at its inputs and its backward runs the forward again).

    Measured seconds (``UnitCost.fwd_seconds`` etc., estimate_costs) when the unit was timed, else FLOPs at
    ``rate``. Values the plan rebuilds one by one are priced by plan_activations from FLOPs and HBM bytes;
    with a measured unit they are scaled by how far its measured forward is from its FLOP estimate (the
    nodes rebuilt are mostly the unit's own products, at the rate the unit reached)."""
    rebuilt = sum(d.recompute_seconds for d in saved.decisions if d.tier is None) if saved is not None else 0.0
    if not cost.measured:
        if phase == Phase.FWD:
            return cost.fwd_flops / rate
        if saved is not None:
            return cost.bwd_flops / rate + rebuilt
        return (cost.fwd_flops + cost.bwd_flops) / rate
    if phase == Phase.FWD:
        return cost.grad_fwd_seconds if saved is not None else cost.fwd_seconds
    if saved is not None:
        scale = cost.fwd_seconds / (cost.fwd_flops / rate) if cost.fwd_flops else 1.0
        return cost.bwd_seconds + rebuilt * scale
    return cost.grad_fwd_seconds + cost.bwd_seconds


def predict_times(ctx: PassContext, transfers, acts: ActivationPlan | None = None,
                  placement: PlacementPlan | None = None) -> TimeProfile:
    """Simulate one step: compute, the H2D and D2H copy lanes, the SSD and the CPU optimizer, each a queue
    (``_simulate``). Where the profile measured how host DRAM is shared (``HardwareProfile.shares_host_dram``),
    the copies and the CPU AdamW slow each other down while they overlap: the step is simulated again with each
    copy and update stretched by how much of it overlapped the other lane in the simulation before (twice:
    stretching moves the overlaps, and a second round settles them)."""
    profile = _simulate(ctx, transfers, acts, placement, {})
    if not ctx.hardware.shares_host_dram:
        return profile
    for _ in range(_DRAM_ROUNDS):
        profile = _simulate(ctx, transfers, acts, placement, host_dram_slowdown(profile.spans, ctx.hardware))
    return profile


_DRAM_ROUNDS = 2
_COPY_LANES = ("h2d", "d2h")


def _merged(intervals) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def _overlap(start: float, end: float, merged) -> float:
    """Seconds of [start, end) covered by the disjoint sorted intervals ``merged``."""
    first = bisect.bisect_right(merged, (start, math.inf)) - 1
    covered = 0.0
    for a, b in merged[max(first, 0):]:
        if a >= end:
            break
        covered += max(0.0, min(b, end) - max(a, start))
    return covered


def host_dram_slowdown(spans, hw) -> dict[tuple[str, str, int], float]:
    """(lane, label, step) -> the factor a copy or CPU update of this simulation takes longer by, because of
    the part of it that ran beside the other (copies beside updates at ``h2d_shared_gbps``, updates beside
    copies at ``cpu_adam_shared_gparams``; D2H copies slowed as H2D's: both are the GPU's DMA into host DRAM).
    Work beside nothing runs at its own rate."""
    copy_factor = hw.h2d_gbps / hw.h2d_shared_gbps
    update_factor = hw.cpu_adam_gparams / hw.cpu_adam_shared_gparams
    copies = _merged((s.start, s.end) for s in spans if s.lane in _COPY_LANES)
    updates = _merged((s.start, s.end) for s in spans if s.lane == "optimizer")
    slowdown = {}
    for s in spans:
        if s.end <= s.start or s.lane not in _COPY_LANES + ("optimizer",):
            continue
        other, factor = (updates, copy_factor) if s.lane in _COPY_LANES else (copies, update_factor)
        beside = _overlap(s.start, s.end, other) / (s.end - s.start)
        if beside > 0:
            slowdown[(s.lane, s.label, s.step)] = 1.0 + beside * (max(factor, 1.0) - 1.0)
    return slowdown


def _simulate(ctx: PassContext, transfers, acts: ActivationPlan | None, placement: PlacementPlan | None,
              slowdown: dict) -> TimeProfile:
    """One simulated step; ``slowdown``: (lane, label, step) -> factor a copy or update takes longer by
    (host_dram_slowdown).

    Copies are issued when their step begins (fetches) or when its compute ends (copies out), run one after
    another on their lane, and wait for what they depend on: an activation or saved value comes back only
    after it went out, and after its SSD read; a step's compute starts when everything it needs has arrived,
    and when the copies out of two steps before have ended (simulate_memory counts what a step sends out on
    the GPU through the next step only: the memory a later step needs is theirs until they are done).
    An update starts when its gradient has landed and its states are read. The step ends when the GPU and
    the optimizer are both done. Groups resident on the GPU (plan_resident_groups) are updated there, on the
    compute lane at HBM bandwidth, and their new weights copied to the host on the D2H lane."""
    hw = ctx.hardware
    lifetimes = ctx.get(Lifetimes)
    placement = placement if placement is not None else ctx.get(PlacementPlan)
    units = ctx.traced.units
    costs = {c.unit: c for c in ctx.get(CostModel).units}
    rate = hw.gpu_tflops * 1e12 * hw.matmul_efficiency
    by_step: dict[int, list] = {}
    for t in transfers:
        by_step.setdefault(t.step, []).append(t)
    arrived: dict[tuple, float] = {}        # (kind, subject, needed_by) -> when the copy lands
    went_out: dict[tuple, float] = {}       # (what, subject) -> when its copy out / update / write ended
    read_done: dict[tuple, float] = {}      # (what, subject) -> when its SSD read ended
    grads_out: dict[str, float] = {}        # unit name -> when its gradients landed on the host
    # Gradients land in a ring of host slots (ir.layout.grad_ring_slots): a unit's flush waits for as many
    # slots as it has groups, each free once the optimizer has used the gradient it held — its update, or
    # with accumulation its sum into fp32 as it lands.
    streamed = host_updated(lifetimes.groups, dict(placement.param_tier))
    ring = grad_ring_slots(streamed, ctx.accumulate, ctx.clip, ctx.ranks)
    slot_free = [0.0] * (ring or 0)         # when each slot is free again
    slot_of: dict[int, int] = {}            # group -> the slot its gradient landed in
    landing: dict[int, list[int]] = {}      # unit -> the groups whose gradient its backward completes
    for g in streamed:
        if g.trainable:
            landing.setdefault(g.update_unit, []).append(g.index)
    spans = []
    times = []
    sent_out: dict[int, float] = {}          # step -> when the copies out its compute produced ended
    gpu = h2d_lane = d2h_lane = ssd_lane = optimizer_lane = scatter_lane = written_back = 0.0
    # unit -> bytes each rank sends to reduce-scatter the gradients its backward completes (several ranks)
    scattered = {u: sum(scatter_bytes(lifetimes.groups[i], ctx.ranks) for i in groups)
                 for u, groups in landing.items()}
    ssd_rate = _ssd_rate(transfers, hw)

    def run(lane_end: float, ready: float, seconds: float, lane: str, label: str, step: int, nbytes: int):
        begin = max(lane_end, ready)
        spans.append(Span(lane, label, begin, begin + seconds, step, nbytes))
        return begin + seconds

    for step in lifetimes.steps:
        t = step.index
        cost = costs[step.unit]
        saved_mode = acts is not None and acts.of(step.unit).mode == "saved"
        compute = compute_seconds(cost, step.phase, acts.of(step.unit) if saved_mode else None, rate)
        at = by_step.get(t, [])
        issue = gpu
        h2d = d2h = ssd = opt = comm = 0.0
        for tr in at:      # SSD reads and host-to-GPU copies are issued as the step begins
            if tr.lane == "ssd" and tr.kind.spec.dst == Tier.HOST:
                seconds = tr.nbytes / ssd_rate
                key = (what(tr.kind), tr.subject)
                ssd_lane = run(ssd_lane, max(issue, went_out.get(key, 0.0)), seconds, "ssd",
                               f"read {tr.subject}", t, tr.nbytes)
                read_done[key] = ssd_lane
                ssd += seconds
        for tr in at:
            if tr.lane == "h2d":
                label = f"{_H2D_LABEL[tr.kind]} {tr.subject}"
                seconds = tr.nbytes / (hw.h2d_gbps * 1e9) * slowdown.get(("h2d", label, t), 1.0)
                key = (what(tr.kind), tr.subject)
                ready = max(issue, went_out.get(key, 0.0), read_done.get(key, 0.0))
                h2d_lane = run(h2d_lane, ready, seconds, "h2d", label, t, tr.nbytes)
                arrived[(tr.kind, tr.subject, tr.needed_by)] = h2d_lane
                h2d += seconds
        needed = [when for (kind, subject, by), when in arrived.items() if by == t]
        start = max([gpu, sent_out.get(t - 2, 0.0)] + needed)
        gpu = run(start, start, compute, "compute", f"{step.phase} {units[step.unit].name}", t, 0)
        for tr in at:      # updates of groups resident on the GPU follow the backward that completes them
            if tr.kind == K.GPU_STEP:
                seconds = tr.nbytes / (hw.hbm_gbps * 1e9)
                # With clipping they wait for the global norm: every gradient on the host.
                ready = max(gpu, d2h_lane) if ctx.clip else gpu
                exchanged = device_exchange_bytes(lifetimes.groups[tr.group], ctx.accumulate, ctx.ranks)
                if exchanged:    # several ranks: the gradient is averaged over the GPUs first
                    sent = exchanged / (hw.ranks_gbps * 1e9)
                    ready = run(ready, ready, sent, "comm", f"exchange {tr.subject}", t, exchanged)
                    comm += sent
                gpu = run(gpu, ready, seconds, "compute", f"adamw {tr.subject}", t, tr.nbytes)
                compute += seconds
                went_out[("params", tr.subject)] = gpu
        for tr in at:      # copies out take what this step's compute produced
            if tr.lane == "d2h":
                label = f"{_D2H_LABEL[tr.kind]} {tr.subject}"
                seconds = tr.nbytes / (hw.d2h_gbps * 1e9) * slowdown.get(("d2h", label, t), 1.0)
                ready = gpu
                groups = landing.get(step.unit, []) if tr.kind == K.FLUSH_GRADS and ring else []
                if tr.kind == K.FLUSH_GRADS and scattered.get(step.unit):
                    # Several ranks: the gradients are reduce-scattered among the GPUs before the slice leaves.
                    sent = scattered[step.unit] / (hw.ranks_gbps * 1e9)
                    scatter_lane = ready = run(scatter_lane, ready, sent, "comm", f"scatter {tr.subject}", t,
                                               scattered[step.unit])
                    comm += sent
                if groups:
                    slots = sorted(range(ring), key=lambda s: slot_free[s])[:len(groups)]
                    ready = max([ready] + [slot_free[s] for s in slots])
                    for group, s in zip(groups, slots):
                        slot_of[group], slot_free[s] = s, math.inf     # held until its update has run
                d2h_lane = run(d2h_lane, ready, seconds, "d2h", label, t, tr.nbytes)
                if ctx.accumulate > 1:
                    for group in groups:
                        slot_free[slot_of.pop(group)] = d2h_lane
                went_out[(what(tr.kind), tr.subject)] = d2h_lane
                if tr.kind == K.FLUSH_GRADS:
                    grads_out[tr.subject] = d2h_lane
                if tr.kind == K.WRITE_BACK_PARAMS:
                    went_out[("params", tr.subject)] = d2h_lane
                    written_back = d2h_lane
                else:       # a resident group's weights stay on the GPU: their copy frees nothing
                    sent_out[t] = d2h_lane
                d2h += seconds
        for tr in at:
            if tr.kind == K.OPTIMIZER_STEP:
                label = f"adamw {tr.subject}"
                seconds = tr.elements / (hw.cpu_adam_gparams * 1e9) * slowdown.get(("optimizer", label, t), 1.0)
                ready = max(grads_out.get(units[step.unit].name, gpu), read_done.get(("states", tr.subject), 0.0))
                exchanged = exchange_bytes(lifetimes.groups[tr.group], ctx.ranks)
                if exchanged:
                    # The optimizer's thread exchanges the group with the other ranks, then updates its slice:
                    # 1/N of the elements, with 1/N of the host's cores (the ranks of one host share them).
                    sent = exchanged / (hw.ranks_gbps * 1e9)
                    ready = run(optimizer_lane, ready, sent, "comm", f"exchange {tr.subject}", t, exchanged)
                    optimizer_lane = ready
                    comm += sent
                optimizer_lane = run(optimizer_lane, ready, seconds, "optimizer", label, t, tr.nbytes)
                went_out[("states", tr.subject)] = optimizer_lane
                went_out[("params", tr.subject)] = optimizer_lane
                if tr.group in slot_of:
                    slot_free[slot_of.pop(tr.group)] = optimizer_lane
                opt += seconds
        for tr in at:
            if tr.lane == "ssd" and tr.kind.spec.src == Tier.HOST:
                seconds = tr.nbytes / ssd_rate
                ssd_lane = run(ssd_lane, went_out.get((what(tr.kind), tr.subject), gpu), seconds, "ssd",
                               f"write {tr.subject}", t, tr.nbytes)
                ssd += seconds
        times.append(StepTime(t, compute, h2d, d2h, opt, ssd, comm))
    # Write-backs of optimizer states may finish during the next forward; the next step's reads wait for them.
    # In steady state every lane must also fit its own work into one step: a lane busier than the GPU and
    # the optimizer together (the SSD, when states outgrow host memory) sets the step's period.
    busiest = max(sum(t.ssd for t in times), sum(t.h2d for t in times), sum(t.d2h for t in times))
    # step() also waits until resident groups' new weights have reached the model's host copies.
    return TimeProfile(steps=tuple(times), total=max(gpu, optimizer_lane, busiest, written_back), spans=tuple(spans))
