"""plan_activations: decisions per saved tensor, equal numerics under every policy, planner invariants."""
import copy
import dataclasses
import math
import os
from pathlib import Path

import pytest
import torch
import torch.fx as fx

import ratel
from helpers import VOCAB, batches, make_model, max_relative_difference
from pipeline_util import GOLDEN, assert_matches_golden, run_until
from ratel.ir import ActivationPlan, CostModel, Plan, Tier
from ratel.passes.plan_activations import describe, recompute_closure


def test_golden_graph_unchanged():
    assert_matches_golden("plan_activations")


def _plans_text() -> str:
    """The activation plans of the tiny GPT for a range of budgets, as describe() prints them."""
    out = []
    _, frugal, _, _ = run_until("verify_plan", activations="recompute", batch=8, seq=16)
    _, keep, _, _ = run_until("verify_plan", activations="keep", batch=8, seq=16)
    low, high = frugal.get(Plan).memory.gpu_peak, keep.get(Plan).memory.gpu_peak
    for budget in (low, (2 * low + high) // 3, (low + 2 * high) // 3, high):
        _, ctx, _, _ = run_until("verify_plan", budget=budget, batch=8, seq=16)
        plan = ctx.get(Plan)
        out.append(f"budget {budget} -> peak {plan.memory.gpu_peak}, predicted {plan.times.total * 1e6:.1f} us")
        out += ["  " + line for line in describe(plan.activations, [u.name for u in plan.units])]
    return "\n".join(out) + "\n"


def test_golden_plans_for_the_reference_gpt():
    text = _plans_text()
    path = GOLDEN / "activation_plans.txt"
    if os.environ.get("RATEL_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), "activation plans changed; rerun with RATEL_UPDATE_GOLDEN=1 if intended"


def _train(policy, kind, dropout, budget="1GiB", ssd_dir=None, steps=4, hardware=None):
    model = make_model(kind, dropout=dropout, layers=3)
    reference = copy.deepcopy(model)
    data = batches(steps, batch=4, seq=16)
    b = ratel.Budget(gpu=budget, ssd_dir=ssd_dir) if ssd_dir else budget
    engine = ratel.compile(model, budget=b, optimizer=ratel.AdamW(lr=1e-3, weight_decay=0.1),
                           example_inputs=(data[0][0],), device="cpu", progress=False, activations=policy,
                           hardware=hardware)
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
    for step, (ids, labels) in enumerate(data):
        torch.manual_seed(step)
        expected = reference(ids, labels=labels).loss
        expected.backward()
        opt.step()
        opt.zero_grad()
        torch.manual_seed(step)
        loss = engine(ids, labels=labels).loss
        engine.backward(loss)
        engine.step()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    worst, name = max_relative_difference(engine.state_dict(), reference)
    plan = engine.plan
    engine.close()
    assert worst < 1e-5, name
    return plan


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("policy", ["recompute", "keep", "host", "ssd", "selective"])
def test_every_fixed_policy_trains_like_pytorch(policy, dropout, tmp_path):
    plan = _train(policy, "gpt", dropout, ssd_dir=str(tmp_path) if policy == "ssd" else None)
    tiers = {d.tier for u in plan.activations.units for d in u.decisions}
    if policy == "recompute":
        assert all(u.mode == "recompute" for u in plan.activations.units)
    elif policy == "selective":
        assert None in tiers
    else:
        assert tiers == {{"keep": Tier.GPU, "host": Tier.HOST, "ssd": Tier.SSD}[policy]}
    assert not any(os.scandir(tmp_path))     # swap files removed on close


@pytest.mark.parametrize("kind", ["gpt", "llama", "gpt2"])
def test_mixed_automatic_plan_trains_like_pytorch(kind):
    model = make_model(kind, layers=3)
    ids = batches(1, batch=4, seq=16)[0][0]
    low = ratel.explain(model, "1GiB", (ids,), device="cpu", activations="recompute").memory.gpu_peak
    high = ratel.explain(model, "1GiB", (ids,), device="cpu", activations="keep").memory.gpu_peak
    # Copies nearly free against compute: the plan moves what does not stay (rather than rerunning units).
    fast_copies = dataclasses.replace(ratel.HardwareProfile.cpu(), h2d_gbps=1000.0, d2h_gbps=1000.0)
    plan = _train("auto", kind, 0.0, budget=(low + high) // 2, hardware=fast_copies)
    tiers = {d.tier for u in plan.activations.units for d in u.decisions}
    assert len(tiers) >= 2 and tiers & {Tier.HOST, Tier.SSD}   # a real mix, with something moved out
    assert plan.memory.gpu_peak <= (low + high) // 2


def test_automatic_plan_with_ssd_recompute_and_dropout(tmp_path):
    # Host memory too small for what is moved out: the rest goes to the SSD; dropout outputs are never
    # recomputed (they would draw new random numbers).
    model = make_model("gpt", dropout=0.1, layers=3)
    ids = batches(1, batch=4, seq=16)[0][0]
    low = ratel.explain(model, "1GiB", (ids,), device="cpu", activations="recompute").memory.gpu_peak
    plan = _train("auto", "gpt", 0.1, budget=ratel.parse_bytes(low * 1.05), ssd_dir=str(tmp_path))
    assert plan.memory.gpu_peak <= low * 1.05


def test_automatic_plan_invariants_over_budgets():
    _, frugal, _, _ = run_until("verify_plan", activations="recompute", batch=8, seq=16)
    _, keep, _, _ = run_until("verify_plan", activations="keep", batch=8, seq=16)
    low, high = frugal.get(Plan).memory.gpu_peak, keep.get(Plan).memory.gpu_peak
    previous_kept = -1
    for budget in [low + (high - low) * i // 6 for i in range(7)]:
        _, ctx, _, _ = run_until("verify_plan", budget=budget, batch=8, seq=16)
        plan, acts, costs = ctx.get(Plan), ctx.get(ActivationPlan), ctx.get(CostModel)
        assert plan.memory.gpu_peak <= budget                             # fits
        for unit, cost in zip(acts.units, costs.units):
            if unit.mode == "saved":
                assert [d.key for d in unit.decisions] == [v.key for v in cost.saved]   # one decision each
                for d, v in zip(unit.decisions, cost.saved):
                    assert v.recomputable or d.tier is not None           # must-store values are stored
        kept = sum(u.bytes_on(Tier.GPU) for u in acts.units)
        assert kept >= previous_kept                                      # more memory, more kept
        previous_kept = kept
        fitting = [r for r in acts.search if r[2] <= budget]
        if fitting:                                                       # the fastest priced plan that fits
            assert plan.times.total == pytest.approx(min(r[1] for r in fitting), rel=1e-9)
        else:                                                             # else every unit recomputed
            assert all(u.mode == "recompute" for u in acts.units)


def test_recompute_closure_on_a_synthetic_graph():
    class Unit(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x):
            a = self.lin(x)
            b = torch.nn.functional.gelu(a)
            c = torch.nn.functional.dropout(b, 0.5, True)
            return (c * b).sum()

    gm = torch.export.export(Unit(), (torch.randn(2, 8),), strict=False).graph_module
    names = [n.name for n in gm.graph.nodes if n.op == "call_function"]
    linear, gelu = next(n for n in names if n.startswith("linear")), next(n for n in names if "gelu" in n)
    dropout = next(n for n in names if "dropout" in n)
    mul = next(n for n in names if n.startswith("mul"))
    assert [n.name for n in recompute_closure(gm, gelu, set())] == [linear, gelu]   # the chain back to inputs
    assert [n.name for n in recompute_closure(gm, gelu, {linear})] == [gelu]       # stored inputs stop it
    assert recompute_closure(gm, dropout, set()) is None                            # random: never again
    assert recompute_closure(gm, mul, set()) is None                                # depends on a random op
    assert recompute_closure(gm, mul, {dropout}) is not None


def test_assignments_price_host_values_and_ssd_staging_within_the_host_left():
    """Whatever _assign hands out fits the host memory it was given, as the runtime lays it out: host values in
    the pinned pool, and the SSD staging regions once anything goes to SSD (SAVED_SSD_REGIONS x the largest
    unit's SSD bytes). Checked on synthetic candidates over a grid of host sizes."""
    import random

    from ratel.ir import SavedDecision, UnitActivations
    from ratel.ir.layout import saved_host_bytes
    from ratel.passes.plan_activations import _assign

    @dataclasses.dataclass(frozen=True)
    class Value:
        key: str
        nbytes: int
        recomputable: bool = True

    rng = random.Random(0)
    candidates = [(-1.0, unit, Value(f"v{unit}_{i}", rng.randrange(1, 5) * 10_000))
                  for unit in range(4) for i in range(3)]
    total = sum(c[2].nbytes for c in candidates)
    outcomes = set()
    for host_free in range(0, 2 * total, total // 25):
        tiers = _assign(candidates, len(candidates), 0, host_free, ssd_ok=True, last_unit=99)
        if tiers is None:
            outcomes.add("refused")
            continue
        plan = ActivationPlan("auto", tuple(UnitActivations(u, "saved", tuple(
            SavedDecision(key=v.key, nbytes=v.nbytes, tier=tiers[u][v.key], recompute_seconds=0.0)
            for _, unit, v in candidates if unit == u)) for u in range(4)))
        assert sum(saved_host_bytes(plan)) <= host_free, host_free
        outcomes.add(frozenset(d.tier for unit in plan.units for d in unit.decisions))
    # The grid saw refusals (not even the staging fits), mixes of host and SSD, and everything on the host.
    assert "refused" in outcomes and frozenset({Tier.HOST, Tier.SSD}) in outcomes and frozenset({Tier.HOST}) in outcomes
