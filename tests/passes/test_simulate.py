"""simulate: compute is priced from measured unit seconds when estimate_costs has them, from FLOPs otherwise
(device-free: synthetic costs, nothing is timed)."""
import dataclasses

import pytest

from pipeline_util import run_until
from ratel.ir import (ActivationPlan, CostModel, Lifetimes, Phase, Plan, SavedDecision, Schedule, Tier, UnitActivations,
                      UnitCost)
from ratel.passes.simulate import compute_seconds, predict_times

RATE = 1e9   # FLOP/s


def _cost(**seconds) -> UnitCost:
    return UnitCost(unit=0, fwd_flops=4_000, bwd_flops=8_000, param_bytes=0, fwd_workspace=0, saved_bytes=0,
                    bwd_workspace=0, output_bytes=0, **seconds)


MEASURED = dict(fwd_seconds=1.0, grad_fwd_seconds=1.5, bwd_seconds=3.0)
REBUILT = UnitActivations(0, "saved", (SavedDecision("a", 8, None, 2e-6), SavedDecision("b", 8, Tier.GPU, 0.0)))
KEPT = UnitActivations(0, "saved", (SavedDecision("b", 8, Tier.GPU, 0.0),))


def test_unmeasured_units_are_priced_from_flops():
    cost = _cost()
    assert not cost.measured
    assert compute_seconds(cost, Phase.FWD, None, RATE) == pytest.approx(4e-6)
    assert compute_seconds(cost, Phase.FWD, KEPT, RATE) == pytest.approx(4e-6)
    assert compute_seconds(cost, Phase.BWD, None, RATE) == pytest.approx(12e-6)      # recompute + backward
    assert compute_seconds(cost, Phase.BWD, REBUILT, RATE) == pytest.approx(8e-6 + 2e-6)


def test_measured_units_are_priced_from_their_seconds():
    cost = _cost(**MEASURED)
    assert cost.measured
    assert compute_seconds(cost, Phase.FWD, None, RATE) == 1.0          # checkpointed: no-grad forward
    assert compute_seconds(cost, Phase.FWD, KEPT, RATE) == 1.5          # saved mode: forward with autograd
    assert compute_seconds(cost, Phase.BWD, None, RATE) == 1.5 + 3.0    # the forward again, then backward
    assert compute_seconds(cost, Phase.BWD, KEPT, RATE) == 3.0
    # A value rebuilt one node at a time: its FLOP-rate estimate scaled as the unit's forward was
    # (measured 1 s where FLOPs said 4 us).
    assert compute_seconds(cost, Phase.BWD, REBUILT, RATE) == pytest.approx(3.0 + 2e-6 * (1.0 / 4e-6))
    # No FLOPs to scale by (an embedding): the rebuilt values' own estimate.
    lookup = dataclasses.replace(cost, fwd_flops=0)
    assert compute_seconds(lookup, Phase.BWD, REBUILT, RATE) == pytest.approx(3.0 + 2e-6)


@pytest.mark.parametrize("activations", ["recompute", "keep"])
def test_the_compute_lane_takes_measured_seconds_when_given_and_flops_otherwise(activations):
    gm, ctx, _, _ = run_until("verify_plan", activations=activations)
    acts, transfers = ctx.get(ActivationPlan), ctx.get(Schedule).transfers
    hw = ctx.hardware
    rate = hw.gpu_tflops * 1e12 * hw.matmul_efficiency
    costs = ctx.get(CostModel)
    assert not any(c.measured for c in costs.units)          # the CPU target is not timed by default
    saved = activations == "keep"
    flops = predict_times(ctx, transfers, acts)
    expected = sum(c.fwd_flops / rate + (c.bwd_flops if saved else c.fwd_flops + c.bwd_flops) / rate
                   for c in costs.units)
    assert flops.compute == pytest.approx(expected)

    timed = dataclasses.replace(costs, units=tuple(
        dataclasses.replace(c, fwd_seconds=0.01 * (c.unit + 1), grad_fwd_seconds=0.02 * (c.unit + 1),
                            bwd_seconds=0.05 * (c.unit + 1)) for c in costs.units))
    ctx.analyses[CostModel] = timed
    measured = predict_times(ctx, transfers, acts)
    per_unit = [((0.02 if saved else 0.01) + (0.05 if saved else 0.07)) * (u + 1) for u in range(len(costs.units))]
    assert measured.compute == pytest.approx(sum(per_unit))
    labels = [s for s in measured.spans if s.lane == "compute"]
    assert len(labels) == 2 * len(costs.units)
    # Only some units timed (one too large to materialise): the others keep the FLOP price.
    ctx.analyses[CostModel] = dataclasses.replace(timed, units=(costs.units[0],) + timed.units[1:])
    mixed = predict_times(ctx, transfers, acts)
    first = costs.units[0]
    assert mixed.compute == pytest.approx(sum(per_unit[1:]) + first.fwd_flops / rate
                                          + (first.bwd_flops if saved else first.fwd_flops + first.bwd_flops) / rate)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_several_ranks_exchange_each_group_before_its_update_on_the_optimizers_thread(accumulate):
    gm, ctx, _, _ = run_until("verify_plan")
    ctx.accumulate = accumulate
    acts, transfers = ctx.get(ActivationPlan), ctx.get(Schedule).transfers
    alone = predict_times(ctx, transfers, acts)
    assert not [s for s in alone.spans if s.lane == "comm"]
    ctx.ranks = 4
    ranked = predict_times(ctx, transfers, acts)
    groups = {g.name: g for g in ctx.get(Lifetimes).groups}
    comm = [s for s in ranked.spans if s.lane == "comm"]
    exchanges = [s for s in comm if s.label.startswith("exchange")]
    updates = [s for s in ranked.spans if s.lane == "optimizer"]
    assert [s.label.split()[1] for s in exchanges] == [s.label.split()[1] for s in updates]
    for exchange, update in zip(exchanges, updates):
        g = groups[exchange.label.split()[1]]
        # this rank's slice of the new weights to the 3 others
        assert exchange.nbytes == g.nbytes * 3 // 4
        assert exchange.end - exchange.start == pytest.approx(exchange.nbytes / (ctx.hardware.ranks_gbps * 1e9))
        assert update.start >= exchange.end                        # one thread: exchange, then update
    # Each unit's completed gradients are reduce-scattered among the GPUs before their slice leaves: 3/4 of them
    # sent (in the compute dtype, every micro-batch), and a quarter copied to the host.
    scatters = {s.label.split()[1]: s for s in comm if s.label.startswith("scatter")}
    flushes = {s.label.split()[1]: s for s in ranked.spans if s.lane == "d2h" and s.label.startswith("flush")}
    for unit, scatter in scatters.items():
        completed = [g for g in groups.values() if g.trainable and ctx.traced.units[g.update_unit].name == unit]
        assert scatter.nbytes == sum(-(-g.numel // 4) * g.dtype.itemsize * 3 for g in completed)
        assert flushes[unit].start >= scatter.end
    assert sorted(scatters) == sorted({ctx.traced.units[g.update_unit].name for g in groups.values() if g.trainable})
    from ratel.passes.insert_transfers import plan_transfers
    from ratel.ir import PlacementPlan
    ranked_flushes = [t for t in plan_transfers(ctx, ctx.get(PlacementPlan), ctx.get(Lifetimes), acts)
                      if t.kind == "flush_grads"]
    for flush in ranked_flushes:    # a quarter of each gradient the unit's backward reads
        used = [g for g in groups.values() if g.trainable and flush.unit in g.users]
        assert flush.nbytes == sum(-(-g.numel // 4) * g.dtype.itemsize for g in used)
    assert sum(t.comm for t in ranked.steps) == pytest.approx(sum(s.end - s.start for s in comm))
    assert ranked.total >= alone.total


def test_the_summary_shows_the_exchange_lane_only_with_several_ranks():
    from ratel.tools.summary import plan_summary

    gm, ctx, _, _ = run_until("verify_plan")
    single = plan_summary(ctx.get(Plan))
    assert "ranks' exchange" not in single
    ctx.ranks = 2
    plan = dataclasses.replace(ctx.get(Plan), ranks=2,
                               times=predict_times(ctx, ctx.get(Schedule).transfers, ctx.get(ActivationPlan)))
    text = plan_summary(plan)
    assert "run by each of 2 data-parallel ranks" in text.splitlines()[0]
    lane_row = next(line for line in text.splitlines() if line.strip().startswith("ranks' exchange"))
    comm = [s for s in plan.times.spans if s.lane == "comm"]
    # a reduce-scatter per unit that completes gradients, an exchange of weights per trainable group
    assert sum(s.nbytes for s in comm) > 0 and f"{len(comm)} collectives" in lane_row
    assert len(comm) == len([g for g in plan.groups if g.trainable]) + len({g.update_unit for g in plan.groups
                                                                             if g.trainable})
    assert "ranks' exchange" in text.split("Per step")[1]           # a column per step too


@pytest.mark.parametrize("activations", ["host", "recompute"])
def test_compute_waits_for_the_copies_out_of_two_steps_before_as_the_memory_model_counts_them(activations):
    """simulate_memory holds what a step copies out (swapped saved values, boundary activations, gradients) on
    the GPU through the next step only; a compute lane that ran further ahead of a slow D2H lane would need
    memory the plan does not have. On the H100 a forward that offloads 1.24 GiB per block ran at the copies'
    pace (26 ms a block against 10 of kernels), where the simulator had let compute run 240 ms ahead."""
    gm, ctx, _, _ = run_until("verify_plan", activations=activations)
    acts, transfers = ctx.get(ActivationPlan), ctx.get(Schedule).transfers
    fast = predict_times(ctx, transfers, acts)
    ctx.hardware = dataclasses.replace(ctx.hardware, d2h_gbps=ctx.hardware.d2h_gbps / 1000)
    slow = predict_times(ctx, transfers, acts)
    copies_out = [s for s in slow.spans if s.lane == "d2h" and not s.label.startswith("write back")]
    assert copies_out
    sent_by_step: dict[int, float] = {}
    for span in copies_out:
        sent_by_step[span.step] = max(sent_by_step.get(span.step, 0.0), span.end)
    computes = [s for s in slow.spans if s.lane == "compute"]
    for span in computes:
        assert span.start >= sent_by_step.get(span.step - 2, 0.0) - 1e-12, span
    # The wait binds: some step starts exactly when the copies out of two steps before end.
    assert any(span.start == pytest.approx(sent_by_step[span.step - 2]) and span.start > 0
               for span in computes if span.step - 2 in sent_by_step)
    assert slow.total > fast.total


def test_copies_and_updates_slow_each_other_by_the_part_of_each_that_overlaps():
    """Host DRAM sharing (device-free, synthetic spans): a copy that ran half beside an update takes half of the
    measured slowdown; D2H copies are slowed as H2D's; work beside nothing keeps its own rate."""
    from ratel.ir import Span
    from ratel.ir.hardware import HardwareProfile
    from ratel.passes.simulate import host_dram_slowdown

    hw = dataclasses.replace(HardwareProfile.h100(), h2d_gbps=55.0, h2d_shared_gbps=34.0, cpu_adam_gparams=4.77,
                             cpu_adam_shared_gparams=3.9)
    spans = [Span("h2d", "params b1", 0.0, 1.0, 3), Span("optimizer", "adamw b2", 0.5, 1.5, 3),
             Span("d2h", "flush b2", 1.25, 1.75, 3), Span("h2d", "params b0", 2.0, 3.0, 4),
             Span("compute", "bwd b1", 0.0, 3.0, 3)]
    slowdown = host_dram_slowdown(spans, hw)
    assert slowdown[("h2d", "params b1", 3)] == pytest.approx(1 + 0.5 * (55 / 34 - 1))
    assert slowdown[("d2h", "flush b2", 3)] == pytest.approx(1 + 0.5 * (55 / 34 - 1))
    # the update overlaps copies over [0.5, 1.0] and [1.25, 1.5]: 0.75 of its second
    assert slowdown[("optimizer", "adamw b2", 3)] == pytest.approx(1 + 0.75 * (4.77 / 3.9 - 1))
    assert ("h2d", "params b0", 4) not in slowdown and not any(lane == "compute" for lane, _, _ in slowdown)


def test_a_profile_that_measured_host_dram_sharing_prices_overlapping_copies_and_updates_slower():
    """On the H100 host the backward's fetches ran at 34 GB/s (55 alone) and the CPU AdamW at 3.9 Gparams/s
    (4.77 alone) while both ran: a plan priced with each alone predicted 0.66 of the measured step."""
    gm, ctx, _, _ = run_until("verify_plan", activations="host")
    acts, transfers = ctx.get(ActivationPlan), ctx.get(Schedule).transfers
    alone = predict_times(ctx, transfers, acts)
    hw = ctx.hardware
    ctx.hardware = dataclasses.replace(hw, h2d_shared_gbps=hw.h2d_gbps, cpu_adam_shared_gparams=hw.cpu_adam_gparams)
    assert predict_times(ctx, transfers, acts) == alone             # sharing measured as costing nothing
    ctx.hardware = dataclasses.replace(hw, h2d_shared_gbps=hw.h2d_gbps / 2,
                                       cpu_adam_shared_gparams=hw.cpu_adam_gparams / 3)
    shared = predict_times(ctx, transfers, acts)
    assert shared.total > alone.total
    for before, after in zip(alone.spans, shared.spans):
        assert (before.lane, before.label, before.step) == (after.lane, after.label, after.step)
        seconds, was = after.end - after.start, before.end - before.start
        most = {"h2d": 2, "d2h": 2, "optimizer": 3}.get(after.lane, 1)
        # never slower than at the shared rate throughout, never faster than alone
        assert was * (1 - 1e-9) <= seconds <= was * most * (1 + 1e-9), (before, after)
    slowed = [a for b, a in zip(alone.spans, shared.spans) if a.end - a.start > (b.end - b.start) * (1 + 1e-9)]
    assert {s.lane for s in slowed} >= {"h2d", "optimizer"}
    # The step's lanes add up the stretched work.
    assert sum(t.optimizer for t in shared.steps) == pytest.approx(
        sum(s.end - s.start for s in shared.spans if s.lane == "optimizer"))
