"""The schedule executor issues every planned transfer exactly once, in the Plan's order.

One plan holds every transfer kind: optimizer states and parameter copies on SSD, saved activations on SSD
(placement sets their staging aside), boundary activations checkpointed to host, and the first groups resident on
the GPU (a GPU budget with room for two of them). A training step runs it; the
executor's log is compared with the Plan's schedule, and the SSD lane's with the SSD transfers.
"""
import collections

import pytest
import torch

import ratel
from ratel.ir import Tier, TransferKind
from ratel.ir.layout import device_state_bytes, host_usage, page, saved_host_bytes
from ratel.models import GPT, GPTConfig
from ratel.passes.plan_placement import param_tiers
from ratel.runtime.calibrate import cpu_adam_kernel

SEQ = 16


def tiny_model():
    torch.manual_seed(0)
    # Small vocabulary: the blocks dominate, so moving their copies to SSD saves more than its staging costs.
    return GPT(GPTConfig(vocab_size=64, n_layer=12, n_head=4, d_model=64, max_seq_len=64,
                         tie_embeddings=False)).to(torch.bfloat16).train()


def budget_for(model, ids, ssd_dir):
    """Host memory for every state and every movable parameter copy on SSD, plus the saved values' staging."""
    probe = ratel.explain(model, ratel.Budget(gpu="1GiB", host="1TiB", ssd_dir=str(ssd_dir)), (ids,),
                          device="cpu", activations="ssd", resident=False)
    states = {g.name: Tier.SSD for g in probe.groups if g.trainable}
    torch_adam = cpu_adam_kernel() == "torch"
    tiers = param_tiers(probe.groups, states, probe.placement.activations,
                        ratel.Budget(gpu="1GiB", host=1, ssd_dir=str(ssd_dir)), torch_adam)
    host = sum(b for _, b in host_usage(probe.groups, states, probe.placement.activations, torch_adam, tiers))
    order = sorted(probe.groups, key=lambda g: (g.update_unit, g.index))
    gpu = probe.memory.gpu_peak + sum(device_state_bytes(g) + g.numel * 4 for g in order[:2])
    # (and host memory for the model's copies of those two, whose copies the tight host budget put on SSD)
    copies = sum(page(g.nbytes) for g in order[:2])
    return ratel.Budget(gpu=gpu, host=host + copies + sum(saved_host_bytes(probe.activations)), ssd_dir=str(ssd_dir))


@pytest.fixture(scope="module")
def step(tmp_path_factory):
    ssd_dir = tmp_path_factory.mktemp("ssd")
    model = tiny_model()
    ids = torch.randint(0, 64, (2, SEQ), generator=torch.Generator().manual_seed(1))
    engine = ratel.compile(model, budget=budget_for(model, ids, ssd_dir), optimizer=ratel.AdamW(lr=1e-3),
                           example_inputs=(ids,), device="cpu", progress=False, activations="ssd", resident=True)
    engine.backward(engine(ids, labels=ids).loss)
    engine.step()
    plan, executor = engine.plan, engine._latest.runtime.schedule
    disk = list(engine._resources.lane.issued)
    log, unplanned = list(executor.log), list(executor.unplanned)
    engine.close()
    return plan, log, unplanned, disk


def test_one_plan_holds_every_transfer_kind(step):
    plan, log, _, _ = step
    assert {plan.transfers[i].kind for i in log} == set(TransferKind)
    assert Tier.SSD in dict(plan.placement.param_tier).values()
    assert Tier.GPU in dict(plan.placement.param_tier).values()
    assert Tier.SSD in dict(plan.placement.optimizer_tier).values()
    assert any(d.tier == Tier.SSD for u in plan.activations.units for d in u.decisions)


def test_every_scheduled_transfer_is_issued_exactly_once(step):
    plan, log, unplanned, _ = step
    counts = collections.Counter(log)
    assert unplanned == []
    assert [i for i in range(len(plan.transfers)) if counts[i] != 1] == []


def test_transfers_are_issued_in_the_plans_order(step):
    plan, log, _, _ = step
    static = [i for i in log if not plan.transfers[i].kind.dynamic]
    assert static == sorted(static)                  # the cursor's order is the Plan's
    for kind in TransferKind:                        # each dynamic kind in the Plan's order for that kind
        if kind.dynamic:
            mine = [i for i in log if plan.transfers[i].kind == kind]
            assert mine == sorted(mine), kind


def test_one_ssd_lane_carries_states_parameters_and_saved_values(step):
    plan, _, _, disk = step
    suffixes = collections.Counter((op, name.rsplit(".", 1)[1]) for op, name in disk)
    for op, suffix in [("read", "adam"), ("write", "adam"), ("read", "param"), ("write", "param"),
                       ("write", "act"), ("read", "act")]:
        assert suffixes[(op, suffix)] > 0, (op, suffix)
    # Each group's states are read once, in the Plan's order (file names start with the group index).
    reads = [int(name.rsplit("/", 1)[1].split("-", 1)[0]) for op, name in disk if op == "read" and name.endswith(".adam")]
    assert reads == list(plan.ssd_state_order())


def test_dynamic_kinds_say_who_decides():
    for kind in TransferKind:
        assert kind.spec.src is not None or kind.spec.dst is not None
        if kind.dynamic:
            assert len(kind.spec.dynamic) > 10, kind
