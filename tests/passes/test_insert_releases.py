import torch

from pipeline_util import assert_matches_golden, run_program, run_until
from ratel.ir import PlacementPlan, Schedule
from ratel.ir import ops


def test_golden_before_after():
    assert_matches_golden("insert_releases")


def test_matches_eager():
    gm, ctx, model, inputs = run_until("insert_releases")
    loss, _ = run_program(gm, ctx, model, inputs)
    assert torch.equal(loss, model(inputs[0], labels=inputs[1]).loss)


def test_every_residency_is_released_exactly_once_after_its_last_use():
    gm, ctx, _, _ = run_until("insert_releases")
    plan = ctx.get(PlacementPlan)
    schedule = ctx.get(Schedule)
    releases = [t for t in schedule.transfers if t.kind == "release_params"]
    assert len(releases) == len(plan.fetches)
    for fetch in plan.fetches:
        matching = [t for t in releases if t.step == fetch.last and t.slot == fetch.slot]
        assert len(matching) == 1
    # In the forward graph, a release follows the unit it frees and precedes no further use of it.
    nodes = list(gm.graph.nodes)
    for node in nodes:
        if node.target is ops.release_params:
            unit = node.args[1]
            later = nodes[nodes.index(node) + 1:]
            assert not any(n.target is ops.run_unit and n.args[1] == unit for n in later)


def test_activations_are_released_after_their_last_backward_reader():
    gm, ctx, _, _ = run_until("insert_releases")
    schedule = ctx.get(Schedule)
    plan = ctx.get(PlacementPlan)
    bwd = {s.unit: s.index for s in ctx.get(__import__("ratel.ir", fromlist=["Lifetimes"]).Lifetimes).steps
           if s.phase.value == "bwd"}
    for act in plan.activations:
        released = [t.step for t in schedule.transfers if t.kind == "release_activation" and t.subject == act.value]
        assert released and max(released) == bwd[min(act.consumers)]
