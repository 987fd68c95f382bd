"""The schedule executor issues every planned transfer exactly once, in the Plan's order.

Two plans cover every transfer kind between them: (a) optimizer states and parameter copies on SSD, units
recomputed; (b) states on SSD, saved activations on SSD, boundary activations checkpointed to host. (One plan cannot hold both SSD parameters and SSD saved values today: placement does not
price the saved values' SSD staging, so a host budget low enough for the first refuses the second.)
A training step runs each plan; the executor's log is compared with the Plan's schedule.
"""
import collections

import pytest
import torch

import ratel
from ratel.ir import Tier, TransferKind
from ratel.ir.layout import host_usage, saved_host_bytes
from ratel.models import GPT, GPTConfig
from ratel.passes.plan_placement import param_tiers
from ratel.runtime.calibrate import cpu_adam_kernel

SEQ = 16


def tiny_model():
    torch.manual_seed(0)
    # Small vocabulary: the blocks dominate, so moving their copies to SSD saves more than its staging costs.
    return GPT(GPTConfig(vocab_size=64, n_layer=12, n_head=4, d_model=64, max_seq_len=64,
                         tie_embeddings=False)).to(torch.bfloat16).train()


def budget_for(model, ids, ssd_dir, activations, params_on_ssd):
    probe = ratel.explain(model, ratel.Budget(gpu="1GiB", host="1TiB"), (ids,), device="cpu", activations=activations)
    states = {g.name: Tier.SSD for g in probe.groups if g.trainable}
    torch_adam = cpu_adam_kernel() == "torch"
    tiers = param_tiers(probe.groups, states, probe.placement.activations,
                        ratel.Budget(gpu="1GiB", host=1, ssd_dir=str(ssd_dir)), torch_adam) if params_on_ssd else None
    host = sum(b for _, b in host_usage(probe.groups, states, probe.placement.activations, torch_adam, tiers))
    if not params_on_ssd:
        host += sum(saved_host_bytes(probe.activations))
    return ratel.Budget(gpu="1GiB", host=host, ssd_dir=str(ssd_dir))


PLANS = {"ssd_params": ("recompute", True), "ssd_saved": ("ssd", False)}


def run_one_step(tmp_path, name):
    activations, params_on_ssd = PLANS[name]
    model = tiny_model()
    ids = torch.randint(0, 64, (2, SEQ), generator=torch.Generator().manual_seed(1))
    budget = budget_for(model, ids, tmp_path, activations, params_on_ssd)
    engine = ratel.compile(model, budget=budget, optimizer=ratel.AdamW(lr=1e-3), example_inputs=(ids,),
                           device="cpu", progress=False, activations=activations)
    engine.backward(engine(ids, labels=ids).loss)
    engine.step()
    plan, executor = engine.plan, engine._latest.runtime.schedule
    log, unplanned = list(executor.log), list(executor.unplanned)
    engine.close()
    return plan, log, unplanned


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    return {name: run_one_step(tmp_path_factory.mktemp(name), name) for name in PLANS}


@pytest.mark.parametrize("name", list(PLANS))
def test_every_scheduled_transfer_is_issued_exactly_once(steps, name):
    plan, log, unplanned = steps[name]
    counts = collections.Counter(log)
    assert unplanned == []
    assert [i for i in range(len(plan.transfers)) if counts[i] != 1] == []


@pytest.mark.parametrize("name", list(PLANS))
def test_transfers_are_issued_in_the_plans_order(steps, name):
    plan, log, _ = steps[name]
    static = [i for i in log if not plan.transfers[i].kind.dynamic]
    assert static == sorted(static)                  # the cursor's order is the Plan's
    for kind in TransferKind:                        # each dynamic kind in the Plan's order for that kind
        if kind.dynamic:
            mine = [i for i in log if plan.transfers[i].kind == kind]
            assert mine == sorted(mine), kind


def test_the_plans_cover_every_transfer_kind(steps):
    seen = {plan.transfers[i].kind for plan, log, _ in steps.values() for i in log}
    assert seen == set(TransferKind)


def test_dynamic_kinds_say_who_decides():
    for kind in TransferKind:
        assert kind.spec.src is not None or kind.spec.dst is not None
        if kind.dynamic:
            assert len(kind.spec.dynamic) > 10, kind
