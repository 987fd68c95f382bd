import pytest

from pipeline_util import assert_matches_golden, run_until
from ratel.ir import PlacementPlan, Tier, timeline
from ratel.passes.plan_placement import activation_tier, ring_schedule

SMALL = 1 << 20


def test_golden_before_after():
    assert_matches_golden("plan_placement")


def test_plan_of_the_tiny_gpt():
    gm, ctx, _, _ = run_until("plan_placement")
    plan = ctx.get(PlacementPlan)
    assert all(tier == Tier.HOST for _, tier in plan.param_tier)
    assert all(tier == Tier.HOST for _, tier in plan.optimizer_tier)
    assert plan.depth == 2 and plan.slot_bytes == max(layout.nbytes for layout in plan.layouts)
    reasons = {a.value: a.reason for a in plan.activations}
    assert reasons["input_ids"] == "user input"
    # The CPU profile offloads every block input: the path the GPU takes for large activations.
    assert reasons["dropout"] == reasons["add_2"] == "unit input checkpoint"
    assert reasons["add_4"] == "read again at the next step"


@pytest.mark.parametrize("units", [1, 2, 3, 5, 12])
@pytest.mark.parametrize("depth", [2, 3, 4])
def test_ring_schedule_invariants(units, depth):
    steps = timeline(units)
    fetches = ring_schedule(steps, depth)
    # Every step has its unit resident, in exactly one residency.
    for step in steps:
        holding = [f for f in fetches if f.first <= step.index <= f.last]
        assert len(holding) == 1 and holding[0].unit == step.unit
    for k, fetch in enumerate(fetches):
        assert fetch.issue <= fetch.first
        assert fetch.slot == k % depth
        # Issued at the start of the previous residency: one ahead, never earlier.
        if k:
            assert fetch.issue == fetches[k - 1].first
        # The slot's previous tenant is done before this copy is issued.
        if k >= depth:
            assert fetches[k - depth].last < fetch.issue or depth == 2 and fetches[k - depth].last < fetch.first
    # The last unit's forward and backward share one residency (no refetch).
    last = [f for f in fetches if f.unit == units - 1]
    assert len(last) == 1 and last[0].last - last[0].first == 1


def test_activation_tier_rules():
    big = SMALL * 4
    assert activation_tier(-1, (0, 3), big, 5, SMALL) == (Tier.GPU, "user input")
    assert activation_tier(0, (1, 2, 3), big, 5, SMALL)[0] == Tier.GPU
    assert activation_tier(1, (2,), SMALL - 1, 5, SMALL) == (Tier.GPU, "small")
    assert activation_tier(1, (2,), SMALL - 1, 5, 0) == (Tier.HOST, "unit input checkpoint")
    assert activation_tier(3, (4,), big, 5, SMALL) == (Tier.GPU, "read again at the next step")
    assert activation_tier(1, (2,), big, 5, SMALL) == (Tier.HOST, "unit input checkpoint")


def test_depth_below_two_is_refused():
    with pytest.raises(Exception, match="at least 2 slots"):
        gm, ctx, *_ = run_until("build_lifetimes")
        ctx.depth = 1
        from ratel.passes.plan_placement import plan_placement
        plan_placement(gm, ctx)


def test_accumulation_plans_fp32_gradient_sums_on_the_host():
    from ratel.ir import Lifetimes
    from ratel.ir.layout import host_usage
    gm, ctx, *_ = run_until("plan_placement")
    groups = ctx.get(Lifetimes).groups
    placement = ctx.get(PlacementPlan)
    tiers = dict(placement.optimizer_tier)
    plain = dict(host_usage(groups, tiers, placement.activations, False))
    accumulating = dict(host_usage(groups, tiers, placement.activations, False, accumulate=4))
    extra = {k: v for k, v in accumulating.items() if k not in plain}
    assert set(extra) == {f"gradient accumulation (fp32):{g.name}" for g in groups if g.trainable}
    assert sum(extra.values()) == sum(4 * g.numel for g in groups if g.trainable)


@pytest.mark.parametrize("policy", ["host", "ssd"])
def test_a_fixed_policy_gets_its_saved_values_host_memory_before_states_are_placed(policy, tmp_path):
    """With host memory for all but the saved values' share, placement moves optimizer states to SSD so
    that the policy's saved values (all of them for "host", the SSD staging for "ssd") fit: the plan is
    accepted, within the budget, where taking the host first for states refused it."""
    import torch

    import ratel
    from ratel.ir.layout import saved_host_bytes
    from ratel.models import GPT, GPTConfig
    torch.manual_seed(0)
    # Many small blocks: moving a few groups' states to SSD frees more than their staging buffers take.
    model = GPT(GPTConfig(vocab_size=64, n_layer=12, n_head=4, d_model=64, max_seq_len=64))
    ids = torch.randint(0, 64, (8, 32))
    roomy = ratel.explain(model, ratel.Budget(gpu="1GiB", host="64GiB", ssd_dir=str(tmp_path)), (ids,),
                          device="cpu", activations=policy)
    saved = sum(saved_host_bytes(roomy.activations))
    assert saved > 0 and all(t == Tier.HOST for _, t in roomy.placement.optimizer_tier)
    host = roomy.memory.host_total - saved // 4
    plan = ratel.explain(model, ratel.Budget(gpu="1GiB", host=host, ssd_dir=str(tmp_path)), (ids,),
                         device="cpu", activations=policy)
    assert plan.memory.host_total <= host
    assert any(t == Tier.SSD for _, t in plan.placement.optimizer_tier)
    assert sum(saved_host_bytes(plan.activations)) == saved
