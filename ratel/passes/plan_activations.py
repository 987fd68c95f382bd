"""plan_activations: for every tensor autograd saves, keep it on the GPU, swap it to host or SSD, or recompute it.

Stages:
  1. Candidates: the values each unit's forward saves for its backward (estimate_costs enumerated them on
     fake tensors, deduplicated by storage), each with its bytes and the time to recompute it: its producing
     node and every unsaved node it needs, matrix ops at the GPU's matrix rate, element-wise ops at HBM
     bandwidth. Values that cannot be recomputed (an op's hidden outputs such as attention's log-sum-exp,
     outputs of random ops) must be stored.
  2. Priority: recompute seconds saved per byte stored; must-store values first.
  3. Search k, the number of values stored, in priority order: the first fill the GPU memory the parameter
     ring and the working set leave over, the next the host memory left after parameters and optimizer
     states, the rest go to SSD (when ``Budget.ssd_dir`` is given). Each candidate is priced with the shared
     simulation (``ratel/passes/simulate.py``): step time from compute + recompute against the PCIe, SSD
     and optimizer lanes, and the GPU peak. The predicted time is convex in the amount swapped (more stored:
     less recompute, more transfer); every k is priced, which is cheap, and the fastest plan that fits wins.
  4. Fixed policies for comparison and tests: "recompute" (checkpoint unit inputs, rerun every unit),
     "keep" (everything on the GPU), "host" / "ssd" (everything that can move, moved), "selective" (rebuild
     every value that can be rebuilt, keep the rest: selective activation checkpointing).

Before / after: the graph is unchanged; the ``ActivationPlan`` analysis records a ``UnitActivations`` per
unit, e.g. ``model.layers.3: saved, 1.2 GiB kept, 3.4 GiB host, 0.8 GiB recomputed``.
"""
from __future__ import annotations

import dataclasses
import math

import torch.fx as fx

from ratel.ir import (META_TENSOR, ActivationPlan, CostModel, Lifetimes, PlacementPlan, SavedDecision, Tier,
                      UnitActivations, format_bytes)
from ratel.passes.build_lifetimes import unit_calls
from ratel.passes.estimate_costs import node_flops
from ratel.passes.insert_transfers import plan_transfers
from ratel.passes.manager import PassContext, PassResult, graph_pass
from ratel.passes.simulate import predict_times, simulate_memory
from ratel.trace import is_random
from ratel.ir.layout import host_usage, page, pool_bytes, saved_staging_bytes

POLICIES = ("auto", "recompute", "keep", "host", "ssd", "selective")


def node_seconds(node: fx.Node, hw) -> float:
    """Time to run one node again: matrix FLOPs at the achievable rate, or its bytes at HBM bandwidth."""
    meta = node.meta.get(META_TENSOR)
    if meta is None or meta.nbytes == 0:      # views and non-tensors cost nothing to redo
        return 0.0
    flops = node_flops(node).fwd_flops
    touched = meta.nbytes + sum(a.meta[META_TENSOR].value_bytes for a in node.all_input_nodes
                                if a.meta.get(META_TENSOR) is not None)
    return max(flops / (hw.gpu_tflops * 1e12 * hw.matmul_efficiency), touched / (hw.hbm_gbps * 1e9))


def recompute_closure(sub: fx.GraphModule, key: str, stored: set[str]) -> list[fx.Node] | None:
    """Nodes to run again to rebuild value ``key`` when ``stored`` values are available; None if a random op
    (or anything not a function call) would have to run again."""
    nodes = {n.name: n for n in sub.graph.nodes}
    position = {name: i for i, name in enumerate(nodes)}
    if key not in nodes:
        return None
    needed: dict[str, fx.Node] = {}
    stack = [nodes[key]]
    while stack:
        node = stack.pop()
        if node.name in needed:
            continue
        if node.op != "call_function" or is_random(node):
            return None
        needed[node.name] = node
        for inp in node.all_input_nodes:
            if inp.op in ("placeholder", "get_attr") or inp.name in stored:
                continue
            stack.append(inp)
    return sorted(needed.values(), key=lambda n: position[n.name])


def _unit_decisions(sub, saved, tiers: dict[str, Tier | None], hw) -> tuple[SavedDecision, ...] | None:
    """Decisions for one unit given a tier per stored key (absent: recompute); None if infeasible. The
    recompute cost of the unit is charged once per node, on the values that need it."""
    stored = {k for k, t in tiers.items() if t is not None}
    seen: set[str] = set()
    decisions = []
    for v in saved:
        tier = tiers.get(v.key)
        seconds = 0.0
        if tier is None:
            closure = recompute_closure(sub, v.key, stored) if v.recomputable else None
            if closure is None:
                return None
            for node in closure:
                if node.name not in seen:
                    seen.add(node.name)
                    seconds += node_seconds(node, hw)
        decisions.append(SavedDecision(key=v.key, nbytes=v.nbytes, tier=tier, recompute_seconds=seconds))
    return tuple(decisions)


def _standalone_seconds(sub, v, hw) -> float:
    if not v.recomputable:
        return math.inf
    closure = recompute_closure(sub, v.key, set())
    if closure is None:
        return math.inf
    own = [n for n in closure if n.name == v.key]
    return sum(node_seconds(n, hw) for n in own) if own else 0.0


def _fixed(policy: str, costs: CostModel, subs, hw, ssd_ok: bool) -> ActivationPlan:
    units = []
    for cost in costs.units:
        if policy == "recompute" or not cost.saved:
            units.append(UnitActivations(cost.unit, "recompute" if policy == "recompute" else "saved"))
            continue
        if policy == "selective":   # recompute what can be, keep the rest (selective activation checkpointing)
            tiers = {v.key: None if v.recomputable else Tier.GPU for v in cost.saved}
            decisions = _unit_decisions(subs[cost.unit], cost.saved, tiers, hw)
            if decisions is None:   # a value depends on a random op: keep every value that cannot be rebuilt
                tiers = {v.key: None if recompute_closure(subs[cost.unit], v.key, set()) else Tier.GPU
                         for v in cost.saved}
                decisions = _unit_decisions(subs[cost.unit], cost.saved, tiers, hw)
            units.append(UnitActivations(cost.unit, "saved", decisions))
            continue
        tier = {"keep": Tier.GPU, "host": Tier.HOST, "ssd": Tier.SSD if ssd_ok else Tier.HOST}[policy]
        decisions = _unit_decisions(subs[cost.unit], cost.saved, {v.key: tier for v in cost.saved}, hw)
        units.append(UnitActivations(cost.unit, "saved", decisions))
    return ActivationPlan(policy=policy, units=tuple(units))


@graph_pass(requires=("analysis:Lifetimes", "analysis:PlacementPlan", "analysis:CostModel"), ensures=("analysis:ActivationPlan",))
def plan_activations(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    return PassResult(gm, modified=False, analysis=choose_activations(gm, ctx, ctx.get(PlacementPlan)))


def choose_activations(gm: fx.GraphModule, ctx: PassContext, placement: PlacementPlan) -> ActivationPlan:
    """The activation plan of ``ctx.activation_policy`` for ``placement`` (plan_resident_groups calls it for
    each placement it weighs)."""
    policy = ctx.activation_policy
    if policy not in POLICIES:
        raise ValueError(f"activations={policy!r}: choose one of {POLICIES}")
    costs = ctx.get(CostModel)
    lifetimes = ctx.get(Lifetimes)
    hw = ctx.hardware
    subs = {call.unit: getattr(gm, call.module) for _, call in unit_calls(gm)}
    ssd_ok = bool(ctx.budget.ssd_dir)
    if policy != "auto":
        return _fixed(policy, costs, subs, hw, ssd_ok)

    def price(plan: ActivationPlan) -> tuple[float, int]:
        transfers = plan_transfers(ctx, placement, lifetimes, plan)
        return (predict_times(ctx, transfers, plan, placement).total,
                simulate_memory(gm, ctx, plan, placement).gpu_peak)

    # Candidates in priority order: must-store first, then the most recompute time saved per byte.
    candidates = []
    for cost in costs.units:
        for v in cost.saved:
            seconds = _standalone_seconds(subs[cost.unit], v, hw)
            candidates.append((-(seconds / max(v.nbytes, 1)), cost.unit, v))
    candidates.sort(key=lambda c: (c[0], c[1], c[2].key))
    must = sum(1 for c in candidates if c[0] == -math.inf)
    last = len(ctx.traced.units) - 1

    # Capacities: GPU memory the rest of the plan leaves over, host memory left after parameters and states.
    decided: dict = {}
    everything_host = _assign(candidates, len(candidates), 0, math.inf, ssd_ok, last)
    base_plan = _plan(costs, subs, hw, everything_host, decided)
    gpu_free = int(ctx.budget.gpu) - (simulate_memory(gm, ctx, base_plan, placement).gpu_peak if base_plan else 0)
    host_fixed = sum(b for _, b in host_usage(lifetimes.groups, dict(placement.optimizer_tier),
                                              placement.activations, ctx.hardware.torch_cpu_adam, dict(placement.param_tier),
                                              accumulate=ctx.accumulate, clip=ctx.clip, ranks=ctx.ranks))
    host_free = max(0, int(ctx.budget.host) - host_fixed)

    priced: dict[int, tuple[float, int, ActivationPlan] | None] = {}

    def evaluate(k: int):
        if k in priced:
            return priced[k]
        result = None
        tiers = _assign(candidates, k, max(gpu_free, 0), host_free, ssd_ok, last)
        plan = _plan(costs, subs, hw, tiers, decided) if tiers is not None else None
        if plan is not None:
            seconds, peak = price(plan)
            # Keeps beyond what fits: hand the lowest-priority ones to the host until the peak fits.
            shrink = gpu_free
            while peak > ctx.budget.gpu and shrink > 0 and plan is not None:
                shrink -= max(peak - int(ctx.budget.gpu), 1 << 20)
                tiers = _assign(candidates, k, max(shrink, 0), host_free, ssd_ok, last)
                plan = _plan(costs, subs, hw, tiers, decided) if tiers is not None else None
                if plan is not None:
                    seconds, peak = price(plan)
            if plan is not None:
                result = (seconds, peak, plan)
        priced[k] = result
        return result

    # The step time is convex in k: a coarse scan, then every k around the best coarse point.
    ks = list(range(must, len(candidates) + 1))
    stride = max(1, len(ks) // 32)
    coarse = ks[::stride] + ([ks[-1]] if ks[-1] % stride else [])
    for k in coarse:
        evaluate(k)

    def fits(k):
        r = priced.get(k)
        return r is not None and r[1] <= ctx.budget.gpu

    feasible = [k for k in priced if fits(k)]
    if feasible:
        center = min(feasible, key=lambda k: priced[k][0])
        for k in range(max(must, center - stride), min(len(candidates), center + stride) + 1):
            evaluate(k)
    search = [(k, r[0], r[1]) for k, r in sorted(priced.items()) if r is not None]
    # Checkpointing whole units is a candidate too (k = -1 in the search record): at tight budgets rerunning
    # each unit can beat rebuilding values one node at a time.
    frugal = _fixed("recompute", costs, subs, hw, ssd_ok)
    frugal_seconds, frugal_peak = price(frugal)
    search.insert(0, (-1, frugal_seconds, frugal_peak))
    priced[-1] = (frugal_seconds, frugal_peak, frugal)
    best = None
    for k, (seconds, peak, plan) in sorted((k, r) for k, r in priced.items() if r is not None):
        if peak > ctx.budget.gpu:
            continue
        # Equal predicted steps (bound by the optimizer or by copies): prefer less recompute, then less moved.
        key = (round(seconds, 9), _recompute_seconds(plan, costs, hw), _moved_bytes(plan))
        if best is None or key < best[0]:
            best = (key, plan)
    if best is None:   # nothing fits: verify_plan refuses the budget with the most frugal plan's peak
        return dataclasses.replace(frugal, search=tuple(search))
    return ActivationPlan(policy="auto", units=best[1].units, search=tuple(search))


def _recompute_seconds(plan: ActivationPlan, costs: CostModel, hw) -> float:
    """Predicted recompute time: values rebuilt one by one, or whole units run again."""
    rate = hw.gpu_tflops * 1e12 * hw.matmul_efficiency
    return sum(costs.units[u.unit].fwd_flops / rate if u.mode == "recompute" else
               sum(d.recompute_seconds for d in u.decisions if d.tier is None) for u in plan.units)


def _moved_bytes(plan: ActivationPlan) -> int:
    return sum(d.nbytes for u in plan.units for d in u.decisions if d.tier in (Tier.HOST, Tier.SSD))


def _assign(candidates, k: int, gpu_free: float, host_free: float, ssd_ok: bool, last_unit: int = -1):
    """Tiers for the first k candidates (GPU, then host, then SSD); the rest recompute. Host memory holds
    each host value (as the pinned pool lays it out) and, once any value goes to SSD, the staging regions
    its unit's SSD values pass through (``saved_staging_bytes`` of the largest unit's): those are set aside
    first, and set aside again larger while the values they displace from the host grow the largest unit.
    The last unit's backward follows its forward at once: a copy out and back could not overlap anything,
    so its values stay on the GPU or are recomputed."""
    staging = 0
    while staging <= host_free:
        tiers: dict[int, dict[str, Tier | None]] = {}
        gpu = host = 0
        ssd_units: dict[int, int] = {}      # unit -> its SSD-resident bytes
        for index, (_, unit, v) in enumerate(candidates):
            if index >= k:
                tier = None
            elif gpu + v.nbytes <= gpu_free or (unit == last_unit and not v.recomputable):
                tier, gpu = Tier.GPU, gpu + v.nbytes
            elif unit == last_unit:
                tier = None
            elif host + pool_bytes([v.nbytes]) <= host_free - staging:
                tier, host = Tier.HOST, host + pool_bytes([v.nbytes])
            elif ssd_ok:
                tier, ssd_units[unit] = Tier.SSD, ssd_units.get(unit, 0) + page(v.nbytes)
            else:
                return None
            tiers.setdefault(unit, {})[v.key] = tier
        needed = saved_staging_bytes(max(ssd_units.values(), default=0))
        if needed <= staging:
            return tiers
        staging = needed
    return None


def _plan(costs: CostModel, subs, hw, tiers, decided: dict | None = None) -> ActivationPlan | None:
    """``decided``: decisions already made, by unit and tiers: the search prices dozens of k that change
    the tiers of one or two units each, and a unit's decisions cost a recompute closure per value."""
    units = []
    for cost in costs.units:
        unit_tiers = tiers.get(cost.unit, {})
        key = (cost.unit, tuple(unit_tiers.items()))
        if decided is not None and key in decided:
            decisions = decided[key]
        else:
            decisions = _unit_decisions(subs[cost.unit], cost.saved, unit_tiers, hw)
            if decided is not None:
                decided[key] = decisions
        if decisions is None:
            return None
        units.append(UnitActivations(cost.unit, "saved", decisions))
    return ActivationPlan(policy="auto", units=tuple(units))


def describe(plan: ActivationPlan, names) -> list[str]:
    """One line per unit: bytes kept / host / SSD / recomputed."""
    lines = []
    for unit in plan.units:
        if unit.mode == "recompute":
            lines.append(f"{names[unit.unit]}: recompute the unit")
            continue
        lines.append(f"{names[unit.unit]}: kept {format_bytes(unit.bytes_on(Tier.GPU))}, host "
                     f"{format_bytes(unit.bytes_on(Tier.HOST))}, SSD {format_bytes(unit.bytes_on(Tier.SSD))}, "
                     f"recomputed {format_bytes(unit.bytes_on(None))}")
    return lines
