import torch

from pipeline_util import assert_matches_golden, run_program, run_until
from ratel.ir import META_TRANSFER, PlacementPlan, Schedule, Tier
from ratel.ir import ops


def test_golden_before_after():
    assert_matches_golden("insert_transfers")


def test_matches_eager():
    gm, ctx, model, inputs = run_until("insert_transfers")
    loss, logits = run_program(gm, ctx, model, inputs)
    expected = model(inputs[0], labels=inputs[1])
    assert torch.equal(loss, expected.loss) and torch.equal(logits, expected.logits)


def test_every_unit_waits_for_parameters_prefetched_one_unit_ahead():
    gm, ctx, _, _ = run_until("insert_transfers")
    order = [(n.target.__name__, n.args[1]) for n in gm.graph.nodes
             if n.op == "call_function" and n.target in (ops.prefetch_params, ops.wait_params, ops.run_unit)]
    units = [u.name for u in ctx.traced.units]
    for i, unit in enumerate(units):
        run = order.index(("run_unit", unit))
        assert order[run - 1] == ("wait_params", unit)
        assert order.index(("prefetch_params", unit)) < run
        if i + 1 < len(units):   # the next unit's copy is issued before this unit runs
            assert order.index(("prefetch_params", units[i + 1])) < run


def test_backward_schedule_fetches_each_host_activation_one_step_ahead():
    gm, ctx, _, _ = run_until("insert_transfers", budget="1GiB")
    schedule = ctx.get(Schedule)
    plan = ctx.get(PlacementPlan)
    for act in plan.activations:
        fetches = [t for t in schedule.transfers if t.kind == "fetch_activation" and t.subject == act.value]
        if act.tier == Tier.HOST:
            assert fetches and all(t.needed_by - t.step <= 1 for t in fetches)
        else:
            assert not fetches
    flushes = [t.subject for t in schedule.transfers if t.kind == "flush_grads"]
    assert flushes == ["head", "blocks.1", "blocks.0", "embed"]
    updates = [t.subject for t in schedule.transfers if t.kind == "optimizer_step"]
    assert updates[-1] == "embed+head"   # the tied group is complete only after the embedding's backward
    for node in gm.graph.nodes:
        if node.target is ops.prefetch_params:
            assert node.meta[META_TRANSFER].kind == "fetch_params"


def test_clipping_moves_every_update_after_the_last_gradient_in_forward_order():
    from ratel.ir import ActivationPlan, Lifetimes
    from ratel.passes.insert_transfers import plan_transfers
    gm, ctx, _, _ = run_until("plan_activations")
    args = (ctx.get(PlacementPlan), ctx.get(Lifetimes), ctx.analyses.get(ActivationPlan))
    lifetimes = args[1]
    during = [t for t in plan_transfers(ctx, *args) if t.kind == "optimizer_step"]
    assert len({t.step for t in during}) > 1                 # without clipping: as each gradient completes
    ctx.clip = True
    clipped = [t for t in plan_transfers(ctx, *args) if t.kind == "optimizer_step"]
    last = len(lifetimes.steps) - 1
    assert all(t.step == last for t in clipped) and len(clipped) == len(during)
    update_unit = {g.name: g.update_unit for g in lifetimes.groups}
    assert [update_unit[t.subject] for t in clipped] == sorted(update_unit[t.subject] for t in clipped)
