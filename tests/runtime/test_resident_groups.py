"""Groups resident on the GPU (plan_resident_groups): weights, master and moments on the device, updated there by
torch's fused AdamW, the model's host copy written back. On the CPU the "GPU" is another host buffer, so the
same path runs here, asked for with ``resident=True``."""
import copy

import pytest
import torch

import ratel
from helpers import (batches, make_model, max_relative_difference, no_decay_groups, resident_budget, train_like_pytorch,
                     train_seeded, train_steps)


def _split(engine):
    plan = engine.plan
    on_gpu = [g for g in plan.groups if plan.placement.on_gpu(g.name)]
    return on_gpu, [g for g in plan.groups if not plan.placement.on_gpu(g.name)]


@pytest.mark.parametrize("accumulate,max_grad_norm", [(1, None), (2, None), (1, 0.05), (2, 0.05)])
def test_resident_and_streamed_groups_train_exactly_like_pytorch(accumulate, max_grad_norm):
    model = make_model("llama", layers=3)
    data = batches(3 * accumulate, batch=2, seq=16)
    budget = resident_budget(model, data[0][0], 3, accumulate, max_grad_norm=max_grad_norm)
    result = train_like_pytorch(model, data, accumulate=accumulate, max_grad_norm=max_grad_norm, budget=budget,
                                groups=lambda m: no_decay_groups(m, 0.1), resident=True, activations="recompute")
    engine = result["engine"]
    on_gpu, streamed = _split(engine)
    assert on_gpu and any(g.trainable for g in streamed)      # both paths ran
    assert engine.plan.memory.gpu_peak <= budget
    assert result["losses"] == result["ref_losses"]
    assert result["norms"] == result["ref_norms"]
    worst, name = max_relative_difference(engine.state_dict(), result["reference"])
    assert worst == 0.0, name
    # The model object holds the trained weights, resident groups' written back after each update.
    reference = dict(result["reference"].named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), reference[name].detach()), name
    engine.close()


def test_a_non_finite_norm_skips_the_update_of_resident_groups_too():
    model = make_model("gpt", layers=2)
    data = batches(3, batch=2, seq=16)
    budget = resident_budget(model, data[0][0], 2, max_grad_norm=1.0)
    with pytest.warns(RuntimeWarning, match="skipped"):
        result = train_like_pytorch(model, data, max_grad_norm=1.0, budget=budget, poison=(1,), resident=True,
                                    activations="recompute")
    engine = result["engine"]
    assert _split(engine)[0] and engine._optimizer.skipped_steps == 1
    worst, name = max_relative_difference(engine.state_dict(), result["reference"])
    assert worst == 0.0, name
    engine.close()


def test_frozen_groups_stay_on_the_gpu_and_only_the_trained_ones_change():
    model = make_model("gpt", layers=3)
    for name, p in model.named_parameters():
        if "blocks.0" in name or "blocks.1" in name:
            p.requires_grad_(False)        # e.g. the base weights under adapters
    data = batches(3, batch=2, seq=16)
    budget = resident_budget(model, data[0][0], 4)
    result = train_like_pytorch(model, data, budget=budget, resident=True, activations="recompute")
    engine = result["engine"]
    on_gpu, _ = _split(engine)
    assert any(not g.trainable for g in on_gpu) and any(g.trainable for g in on_gpu)
    assert result["losses"] == result["ref_losses"]
    worst, name = max_relative_difference(engine.state_dict(), result["reference"])
    assert worst == 0.0, name
    engine.close()


def test_a_bf16_model_keeps_fp32_masters_on_the_gpu_like_mixed_precision():
    from helpers import mixed_precision_reference
    # The reference GPT, whose exported graph runs eager's very ops in bf16 (see tests/runtime/test_ssd.py).
    model = make_model("gpt_untied", layers=3, dtype=torch.bfloat16)
    data = batches(3, batch=2, seq=16)
    budget = resident_budget(model, data[0][0], 3)
    reference_losses, masters = mixed_precision_reference(model, data, lr=1e-3, weight_decay=0.1)
    engine = ratel.compile(model, budget=budget, optimizer=ratel.AdamW(lr=1e-3, weight_decay=0.1),
                           example_inputs=(data[0][0],), device="cpu", progress=False, resident=True,
                           activations="recompute")
    assert _split(engine)[0]
    assert train_seeded(engine, data) == reference_losses
    state = engine.state_dict()
    for name, master in masters.items():
        assert torch.equal(state[name], master.detach()), name
        assert torch.equal(model.get_parameter(name).detach(), master.detach().to(torch.bfloat16)), name
    engine.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_checkpoint_with_resident_groups_resumes_resident_or_streaming(tmp_path, dtype):
    torch.manual_seed(0)
    model = make_model("gpt", layers=3, dtype=dtype)
    data = batches(4, batch=2, seq=16)
    budget = resident_budget(model, data[0][0], 3)
    opts = dict(device="cpu", progress=False, activations="recompute")
    whole = copy.deepcopy(model)
    continuous = ratel.compile(whole, budget=budget, optimizer=ratel.AdamW(lr=1e-2), example_inputs=(data[0][0],),
                               resident=True, **opts)
    assert _split(continuous)[0]
    expected = train_steps(continuous, data)
    final = continuous.state_dict()
    continuous.close()

    first = ratel.compile(model, budget=budget, optimizer=ratel.AdamW(lr=1e-2), example_inputs=(data[0][0],),
                          resident=True, **opts)
    head = train_steps(first, data[:2])
    first.save(tmp_path / "ckpt")
    first.close()
    for resident in (True, False):
        again = make_model("gpt", layers=3, dtype=dtype)
        resumed = ratel.compile(again, budget=budget, optimizer=ratel.AdamW(lr=1e-2), example_inputs=(data[0][0],),
                                resident=resident, resume=str(tmp_path / "ckpt"), **opts)
        assert bool(_split(resumed)[0]) == resident
        tail = train_steps(resumed, data[2:])
        assert head + tail == expected
        state = resumed.state_dict()
        for name, value in final.items():
            assert torch.equal(state[name], value), (resident, name)
        resumed.close()


def test_a_later_input_shape_keeps_the_groups_the_first_put_on_the_gpu():
    model = make_model("gpt", layers=3)
    short, long = batches(1, batch=2, seq=8)[0], batches(1, batch=2, seq=16)[0]
    budget = resident_budget(model, long[0], 2)
    reference = copy.deepcopy(model)
    engine = ratel.compile(model, budget=budget, optimizer=ratel.AdamW(lr=1e-3), example_inputs=(short[0],),
                           device="cpu", progress=False, resident=True, activations="recompute")
    first = {g.name for g in _split(engine)[0]}
    assert first
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-3, fused=True)
    for ids, labels in (short, long, short):
        loss = engine(ids, labels=labels).loss
        engine.backward(loss)
        engine.step()
        ref = reference(ids, labels=labels).loss
        ref.backward()
        opt.step()
        opt.zero_grad()
        assert loss.item() == ref.item()
        assert {g.name for g in _split(engine)[0]} == first
    worst, name = max_relative_difference(engine.state_dict(), reference)
    assert worst == 0.0, name
    engine.close()



def test_a_later_shape_that_does_not_fit_with_the_first_shapes_groups_names_them():
    model = make_model("gpt", layers=3)
    short = batches(1, batch=2, seq=8)[0]
    long = batches(1, batch=8, seq=64)[0]
    budget = resident_budget(model, short[0], 2)
    engine = ratel.compile(model, budget=budget, optimizer=ratel.AdamW(lr=1e-3), example_inputs=(short[0],),
                           device="cpu", progress=False, resident=True, activations="recompute")
    kept = [g.name for g in _split(engine)[0]]
    assert kept
    with pytest.raises(ratel.BudgetError) as info:
        engine(long[0], labels=long[1])
    message = str(info.value)
    assert f"keeps {len(kept)} parameter groups on the GPU ({', '.join(kept)})" in message
    assert "first input shape was planned" in message
    assert "resident=False" in message and "largest shape" in message
    engine.close()


def test_named_groups_that_do_not_fit_are_refused_saying_compile_named_them():
    model = make_model("gpt", layers=3)
    ids = batches(1, batch=2, seq=16)[0][0]
    streaming = ratel.explain(model, "1GiB", (ids,), device="cpu", resident=False, activations="recompute")
    names = [g.name for g in streaming.groups]
    with pytest.raises(ratel.BudgetError) as info:
        ratel.compile(model, budget=streaming.memory.gpu_peak, example_inputs=(ids,), device="cpu", progress=False,
                      resident=names, activations="recompute")
    assert f"keeps {len(names)} parameter groups on the GPU" in str(info.value)
    assert "as compile named them" in str(info.value)


def test_a_profiled_step_times_each_update_on_the_gpu_where_the_plan_puts_it():
    model = make_model("gpt", layers=3)
    data = batches(1, batch=2, seq=16)
    engine = ratel.compile(model, budget=resident_budget(model, data[0][0], 2), example_inputs=(data[0][0],),
                           device="cpu", progress=False, resident=True, activations="recompute")
    engine.profile = True
    train_steps(engine, data)
    trained = [g.name for g in _split(engine)[0] if g.trainable]
    measured = {(s.lane, s.label) for s in engine.last_step.spans}
    planned = {(s.lane, s.label) for s in engine.plan.times.spans}
    for name in trained:
        assert ("compute", f"adamw {name}") in measured and ("compute", f"adamw {name}") in planned
    engine.close()


def test_named_groups_stay_on_the_gpu_whether_or_not_the_plan_finds_them_faster():
    # resident=[names]: exactly those groups, as a user who knows the card asks (and the GPU tests, whose tiny
    # models gain nothing from it); training is still PyTorch's, bit for bit.
    model = make_model("gpt", layers=3)
    data = batches(3, batch=2, seq=16)
    groups = ratel.explain(model, "1GiB", (data[0][0],), device="cpu", resident=False).groups
    names = [groups[-1].name, groups[1].name]       # any groups, in any order: the last unit's too
    result = train_like_pytorch(model, data, budget="1GiB", resident=names, max_grad_norm=0.5)
    engine = result["engine"]
    assert sorted(engine.plan.placement.gpu_groups) == sorted(names)
    assert result["losses"] == result["ref_losses"]
    worst, name = max_relative_difference(engine.state_dict(), result["reference"])
    assert worst == 0.0, name
    engine.close()


@pytest.mark.parametrize("resident,message", [("embed", "list of parameter group names"),
                                              (["no.such.group"], "no parameter group named")])
def test_a_resident_value_that_names_no_groups_is_refused(resident, message):
    model = make_model("gpt", layers=2)
    ids = batches(1, batch=2, seq=16)[0][0]
    with pytest.raises(ratel.RatelError, match=message):
        ratel.compile(model, budget="1GiB", example_inputs=(ids,), device="cpu", progress=False, resident=resident)
