import os

import pytest
import torch

import ratel
from pipeline_util import GOLDEN, run_program, run_until, tiny_inputs, tiny_model
from ratel.errors import PassError
from ratel.ir import Lifetimes, ParamGroup, PlacementPlan, Plan, Schedule, Tier
from ratel.ir.hardware import HardwareProfile
from ratel.ir.layout import device_state_bytes, host_usage
from ratel.models import GPT, GPTConfig
from ratel.passes.plan_resident_groups import candidates


def _tiers(placement: PlacementPlan) -> str:
    states = dict(placement.optimizer_tier)
    lines = [f"  {name}: weights {tier}, states {states.get(name, '-')}" for name, tier in placement.param_tier]
    return "\n".join(lines + [f"  ring slot {placement.slot_bytes} B"])


def test_golden_before_after():
    _, before, _, _ = run_until("plan_activations", resident=True)
    _, after, _, _ = run_until("plan_resident_groups", resident=True)
    text = f"{_tiers(before.get(PlacementPlan))}\n->\n{_tiers(after.get(PlacementPlan))}\n"
    path = GOLDEN / "plan_resident_groups.txt"
    if os.environ.get("RATEL_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), "resident groups changed; rerun with RATEL_UPDATE_GOLDEN=1 if intended"


def test_the_program_still_equals_eager():
    gm, ctx, model, inputs = run_until("plan_resident_groups", resident=True)
    assert any(tier == Tier.GPU for _, tier in ctx.get(PlacementPlan).param_tier)
    loss, _ = run_program(gm, ctx, model, inputs)
    assert torch.equal(loss, model(inputs[0], labels=inputs[1]).loss)


def _group(index: int, users: tuple[int, ...], trainable: bool = True) -> ParamGroup:
    return ParamGroup(index=index, name=f"g{index}", params=(f"p{index}",), shapes=((4,),), offsets=(0,), numel=4,
                      dtype=torch.bfloat16, users=users, trainable=trainable)


def test_candidates_come_in_the_order_their_gradients_arrive_last():
    # Backward runs units in reverse: a group's gradient is complete after its lowest user, so the groups of
    # the first units arrive last and come first; a frozen group is a candidate too (it saves its streaming).
    groups = (_group(0, (3,)), _group(1, (0, 3)), _group(2, (1,), trainable=False), _group(3, (0,)), _group(4, (2,)))
    lifetimes = Lifetimes(steps=(), groups=groups, records=())
    assert [g.name for g in candidates(lifetimes)] == ["g1", "g3", "g2", "g4", "g0"]


def test_device_bytes_count_weights_master_moments_and_the_accumulation_sum():
    g = _group(0, (0,))
    assert device_state_bytes(g) == 256 + 3 * 256                 # bf16 weights; master, m, v (256-byte aligned)
    assert device_state_bytes(g, accumulate=2) == 256 + 4 * 256
    assert device_state_bytes(_group(1, (0,), trainable=False)) == 256


def test_a_cpu_target_keeps_every_group_streaming_unless_asked():
    _, ctx, _, _ = run_until("verify_plan")
    assert all(tier != Tier.GPU for _, tier in ctx.get(PlacementPlan).param_tier)
    _, ctx, _, _ = run_until("verify_plan", resident=True)
    assert any(tier == Tier.GPU for _, tier in ctx.get(PlacementPlan).param_tier)


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 1.0])
def test_resident_groups_fit_the_budget_and_shorten_the_predicted_step(fraction):
    _, streaming, _, _ = run_until("verify_plan", resident=False, activations="recompute")
    lifetimes = streaming.get(Lifetimes)
    low = streaming.get(Plan).memory.gpu_peak
    everything = sum(device_state_bytes(g) for g in lifetimes.groups)
    budget = int(low + fraction * everything)
    _, base, _, _ = run_until("verify_plan", budget=budget, resident=False, activations="recompute")
    _, ctx, _, _ = run_until("verify_plan", budget=budget, resident=True, activations="recompute")
    plan = ctx.get(Plan)
    resident = [g for g in plan.groups if plan.placement.on_gpu(g.name)]
    assert plan.memory.gpu_peak <= budget
    if resident:
        assert plan.times.total < base.get(Plan).times.total
        # The first to go are those whose gradients arrive last.
        order = [g.name for g in candidates(lifetimes)]
        assert sorted(order.index(g.name) for g in resident) == list(range(len(resident)))
    else:
        assert plan.times.total == base.get(Plan).times.total
    if fraction == 0.0:
        assert not resident
    if fraction == 1.0:
        assert resident


def test_the_simulation_prices_resident_groups_where_they_live():
    _, ctx, _, _ = run_until("verify_plan", resident=True)
    plan, transfers = ctx.get(Plan), ctx.get(Schedule).transfers
    resident = [g for g in plan.groups if plan.placement.on_gpu(g.name)]
    streamed = [g for g in plan.groups if not plan.placement.on_gpu(g.name)]
    assert resident and streamed
    held = sum(device_state_bytes(g) for g in resident)
    assert all(dict(s.breakdown)["resident parameters"] + dict(s.breakdown)["resident optimizer states"] == held
               for s in plan.memory.steps)
    # Never fetched, never flushed, updated on the GPU and written back to the model's copy.
    _, streaming, _, _ = run_until("verify_plan", resident=False)
    fetched = sum(t.nbytes for t in transfers if t.kind == "fetch_params")
    assert fetched < sum(t.nbytes for t in streaming.get(Schedule).transfers if t.kind == "fetch_params")
    in_slots = {i for layout in plan.placement.layouts for i in layout.groups}
    for g in resident:
        assert g.index not in in_slots
        kinds = [t.kind for t in transfers if t.group == g.index]
        assert "optimizer_step" not in kinds
        if g.trainable:
            assert kinds.count("gpu_step") == 1 and kinds.count("write_back_params") == 1
    flushed = sum(t.nbytes for t in transfers if t.kind == "flush_grads")
    assert flushed == sum(g.nbytes * len(g.users) for g in streamed if g.trainable)
    updates = [s for s in plan.times.spans if s.lane == "compute" and s.label.startswith("adamw")]
    assert sorted(s.label for s in updates) == sorted(f"adamw {g.name}" for g in resident if g.trainable)
    # The host keeps only the copy the model aliases: no master, moments or gradient staging.
    usage = dict(host_usage(plan.groups, dict(plan.placement.optimizer_tier), plan.placement.activations, False,
                            dict(plan.placement.param_tier)))
    for g in resident:
        assert not [name for name in usage if name.endswith(f":{g.name}") and "compute copy" not in name
                    and "fp32 master (compute copy)" not in name and "frozen" not in name]


def test_a_fixed_set_is_kept_and_an_unknown_group_is_refused():
    _, chosen, _, _ = run_until("verify_plan", resident=True)
    names = tuple(n for n, t in chosen.get(PlacementPlan).param_tier if t == Tier.GPU)
    first = names[:1]
    _, ctx, _, _ = run_until("verify_plan", resident_groups=first)
    assert tuple(n for n, t in ctx.get(PlacementPlan).param_tier if t == Tier.GPU) == first
    _, ctx, _, _ = run_until("verify_plan", resident=True, resident_groups=())
    assert not any(t == Tier.GPU for _, t in ctx.get(PlacementPlan).param_tier)
    with pytest.raises(PassError, match="no parameter group named"):
        run_until("verify_plan", resident_groups=("nonexistent",))


def test_with_several_ranks_a_resident_groups_gradient_is_averaged_over_the_gpus_before_its_update():
    from ratel.ir.budget import Budget
    from ratel.ir.layout import device_exchange_bytes
    from ratel.passes import plan_call
    model = tiny_model()
    ids, labels = tiny_inputs()
    _, _, plan = plan_call(model, (ids,), {"labels": labels}, Budget(gpu="1GiB", host="64GiB"),
                           HardwareProfile.cpu(), torch.device("cpu"), resident=True, ranks=2)
    resident = [g for g in plan.groups if plan.placement.on_gpu(g.name) and g.trainable]
    assert resident
    spans = plan.times.spans
    for g in resident:
        exchange = next(s for s in spans if s.lane == "comm" and s.label == f"exchange {g.name}")
        update = next(s for s in spans if s.lane == "compute" and s.label == f"adamw {g.name}")
        assert exchange.nbytes == device_exchange_bytes(g, 1, 2) == g.nbytes   # 2 (N-1)/N of the gradient
        assert update.start >= exchange.end


def test_a_cuda_plan_of_a_small_batch_keeps_the_first_groups_on_the_gpu():
    # Planned for the H100 profile from this machine (nothing runs): a roomy budget holds the first units'
    # groups, whose CPU updates would otherwise end the step; a budget at the streaming minimum holds none.
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=50257, n_layer=4, n_head=16, d_model=1024, max_seq_len=512))
    ids = torch.zeros(1, 512, dtype=torch.long)
    hw = HardwareProfile.h100()
    streaming = ratel.explain(model, "64GiB", (ids,), hardware=hw, resident=False, activations="recompute")
    roomy = ratel.explain(model, "64GiB", (ids,), hardware=hw)
    on_gpu = [g for g in roomy.groups if roomy.placement.on_gpu(g.name)]
    assert on_gpu and roomy.times.total < streaming.times.total
    assert on_gpu[0].update_unit == 0
    tight = ratel.explain(model, streaming.memory.gpu_peak, (ids,), hardware=hw, activations="recompute")
    assert not any(tight.placement.on_gpu(g.name) for g in tight.groups)


def test_the_step_ends_when_the_last_write_back_has_reached_the_host():
    # step() waits for the copies to the model's host copies: the predicted step is no shorter than them.
    _, ctx, _, _ = run_until("verify_plan", resident=True)
    plan = ctx.get(Plan)
    write_backs = [s for s in plan.times.spans if s.lane == "d2h" and s.label.startswith("write back")]
    assert write_backs and plan.times.total >= max(s.end for s in write_backs)


def test_the_summary_names_the_groups_kept_on_the_gpu():
    from ratel.tools.summary import plan_summary
    _, ctx, _, _ = run_until("verify_plan", resident=True)
    plan = ctx.get(Plan)
    on_gpu = [g for g in plan.groups if plan.placement.on_gpu(g.name)]
    header = plan_summary(plan).splitlines()[1]
    assert f"{len(on_gpu)} kept on the" in header and on_gpu[0].name in header
    _, streaming, _, _ = run_until("verify_plan")
    assert "kept on the" not in plan_summary(streaming.get(Plan)).splitlines()[1]
