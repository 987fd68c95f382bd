import operator

import pytest
import torch
import torch.fx as fx

from pipeline_util import assert_matches_golden, run_until, tiny_inputs, tiny_model
from ratel.errors import BudgetError, PlanViolation
from ratel.ir import Plan
from ratel.passes.verify_plan import check_plan_invariants
from ratel.ir import ops


def test_golden_graph_unchanged():
    assert_matches_golden("verify_plan")


def test_plan_memory_and_refusal():
    gm, ctx, _, _ = run_until("verify_plan")
    plan = ctx.get(Plan)
    assert plan.memory.gpu_peak == max(s.gpu for s in plan.memory.steps)
    assert all(s.gpu == sum(b for _, b in s.breakdown) for s in plan.memory.steps)
    # The most frugal plan recomputes every unit; below its peak nothing fits, and the error names it.
    _, frugal_ctx, _, _ = run_until("verify_plan", activations="recompute")
    frugal = frugal_ctx.get(Plan).memory.gpu_peak
    with pytest.raises(BudgetError) as info:
        run_until("verify_plan", budget=frugal - 1)
    assert info.value.needed == frugal
    assert "bwd" in str(info.value) or "fwd" in str(info.value)


def test_predicted_time_is_at_least_the_compute():
    gm, ctx, _, _ = run_until("verify_plan")
    plan = ctx.get(Plan)
    assert plan.times.total >= plan.times.compute > 0


def _synthetic(ctx, edit):
    """The real top-level graph with one edit applied, checked by the invariant verifier."""
    gm, ctx, _, _ = run_until("insert_releases")
    edit(gm.graph)
    check_plan_invariants(gm, ctx)


def test_invariants_catch_a_unit_run_before_its_wait():
    def drop_first_wait(graph):
        graph.erase_node(next(n for n in graph.nodes if n.target is ops.wait_params))
    with pytest.raises(PlanViolation, match="before waiting"):
        _synthetic(None, drop_first_wait)


def test_invariants_catch_a_prefetch_over_a_busy_slot():
    def drop_first_release(graph):
        graph.erase_node(next(n for n in graph.nodes if n.target is ops.release_params))
    with pytest.raises(PlanViolation, match="overwrites"):
        _synthetic(None, drop_first_release)


def test_invariants_catch_a_wait_without_prefetch():
    def drop_a_prefetch(graph):
        graph.erase_node([n for n in graph.nodes if n.target is ops.prefetch_params][1])
    with pytest.raises(PlanViolation):
        _synthetic(None, drop_a_prefetch)


def test_peak_grows_with_the_batch():
    from ratel.ir.budget import Budget
    from ratel.passes import plan_program
    from ratel.ir.hardware import HardwareProfile
    from ratel.trace import trace_model
    peaks = []
    for batch in (1, 4, 16):
        ids = torch.randint(0, 64, (batch, 8))
        traced = trace_model(tiny_model(), (ids,), {"labels": ids})
        _, plan = plan_program(traced, Budget(gpu="1GiB", host="8GiB"), HardwareProfile.cpu(), torch.device("cpu"))
        peaks.append(plan.memory.gpu_peak)
    assert peaks[0] < peaks[1] < peaks[2]


def test_a_plan_for_cuda_holds_cublas_workspace_at_every_step():
    """cuBLAS allocates its workspace on the engine's stream at the first product and keeps it: a fresh
    process measured 33.5 MB above a plan that left it out (H200). Plans for CUDA count it; CPU plans not."""
    import ratel
    from ratel.passes.simulate import CUBLAS_WORKSPACE
    ids, _ = tiny_inputs()
    for device, expected in (("cuda", CUBLAS_WORKSPACE), ("cpu", 0)):
        plan = ratel.explain(tiny_model(), "1GiB", (ids,), device=device)
        assert all(dict(s.breakdown)["cuBLAS workspace"] == expected for s in plan.memory.steps)
        assert plan.memory.gpu_peak >= expected


def test_the_ssd_lane_moves_a_steps_bytes_at_the_disks_roofline(tmp_path):
    """Reads and writes run side by side on the SSD lane: its busy time is max(read / read rate, written /
    write rate, both / both-at-once rate), not the two directions one after the other (that over-predicted
    the 12.53B step by 14 % on the H200)."""
    import dataclasses
    import ratel
    from ratel.ir.hardware import HardwareProfile
    from helpers import batches, host_minimum, make_model
    model = make_model("gpt", layers=4)
    ids = batches(1)[0][0]
    budget = ratel.Budget(gpu="1GiB", host=host_minimum(model, ids), ssd_dir=str(tmp_path))
    for read, write, both in ((2.0, 4.0, 3.0), (2.0, 4.0, 1.0), (0.5, 4.0, 9.0)):
        hw = dataclasses.replace(HardwareProfile.cpu(), ssd_read_gbps=read, ssd_write_gbps=write,
                                 ssd_both_gbps=both)
        plan = ratel.explain(model, budget, (ids,), device="cpu", hardware=hw)
        moved_in = sum(t.nbytes for t in plan.transfers if t.lane == "ssd" and t.kind.spec.dst == ratel.ir.Tier.HOST)
        moved_out = sum(t.nbytes for t in plan.transfers if t.lane == "ssd" and t.kind.spec.src == ratel.ir.Tier.HOST)
        assert moved_in and moved_out
        busy = sum(s.end - s.start for s in plan.times.spans if s.lane == "ssd")
        roofline = max(moved_in / (read * 1e9), moved_out / (write * 1e9), (moved_in + moved_out) / (both * 1e9))
        assert busy == pytest.approx(roofline, rel=1e-9)
