"""Training as PyTorch users write it: accumulation, clipping, frozen parameters, LR schedules, the model
object after training, and misuse. Every result is compared with plain PyTorch + torch.optim.AdamW."""
import copy
import math

import pytest
import torch

import ratel
from helpers import (assert_trained_alike, batches, make_model, no_decay_groups, param_bytes,
                     train_like_pytorch)
from ratel.passes.plan_activations import POLICIES

ARCHITECTURES = ["gpt", "gpt2", "llama"]


def streaming_budget(model, ids, policy: str = "recompute", **budget_kwargs):
    """The GPU peak of ``policy``'s plan: a budget below the parameter bytes, so parameters stream."""
    # "auto" gets the most frugal plan's peak: it must then choose what to keep under pressure.
    probe = ratel.compile(model, budget=ratel.Budget(gpu="1TiB", **budget_kwargs), example_inputs=(ids,),
                          device="cpu", progress=False, activations="recompute" if policy == "auto" else policy)
    peak = probe.plan.memory.gpu_peak
    probe.close()
    assert peak < param_bytes(model), "the test must stream parameters"
    return ratel.Budget(gpu=peak, **budget_kwargs) if budget_kwargs else peak


# ---------------------------------------------------------------------------------------------- accumulation
@pytest.mark.parametrize("kind", ARCHITECTURES)
@pytest.mark.parametrize("k", [2, 4])
def test_accumulation_applies_one_update_of_the_summed_gradients(kind, k):
    model = make_model(kind, dropout=0.1, layers=8)
    data = batches(5 * k)
    result = train_like_pytorch(model, data, accumulate=k, budget=streaming_budget(model, data[0][0]))
    assert_trained_alike(result)
    engine = result["engine"]
    assert engine._store.steps[0].item() == 5          # five updates, not 5 * k
    host = dict(engine.plan.memory.host_bytes)
    accumulation = sum(b for name, b in host.items() if name.startswith("gradient accumulation"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert accumulation == 4 * trainable                # fp32 sums, planned and counted in host_total
    assert engine.host_bytes_allocated() <= engine.plan.memory.host_total
    from ratel.ir import format_bytes
    from ratel.tools.summary import host_category
    grads = sum(b for name, b in engine.plan.memory.host_bytes if host_category(name) == "gradients")
    assert grads > accumulation and format_bytes(grads) in ratel.summary(engine.plan)   # the summary shows it
    engine.close()


def test_step_after_fewer_micro_batches_updates_with_the_sum_so_far():
    # The last, partial accumulation of an epoch: PyTorch's optimizer.step() uses whatever p.grad holds.
    model = make_model("gpt", layers=8)
    data = batches(3)
    reference = copy.deepcopy(model)
    engine = ratel.compile(model, budget=streaming_budget(model, data[0][0]), optimizer=ratel.AdamW(lr=1e-3), example_inputs=(data[0][0],),
                           device="cpu", progress=False, accumulate=4)
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-3, fused=True)
    for ids, labels in data:
        engine.backward(engine(ids, labels=labels).loss / 4)
        (reference(ids, labels=labels).loss / 4).backward()
    engine.step()
    opt.step()
    state = engine.state_dict()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(state[name], p.detach(), rtol=1e-5, atol=1e-7)
    engine.close()


def test_too_many_backwards_for_accumulate_is_refused():
    model = make_model("gpt", layers=2)
    data = batches(3)
    engine = ratel.compile(model, budget="1GiB", example_inputs=(data[0][0],), device="cpu", progress=False,
                           accumulate=2)
    for ids, labels in data[:2]:
        engine.backward(engine(ids, labels=labels).loss)
    loss = engine(*data[2][:1], labels=data[2][1]).loss
    with pytest.raises(ratel.RatelError, match="accumulate=2"):
        engine.backward(loss)
    engine.close()


# ---------------------------------------------------------------------------------------------- clipping
@pytest.mark.parametrize("kind", ARCHITECTURES)
@pytest.mark.parametrize("max_norm", [0.05, 1e6], ids=["clips_every_step", "never_clips"])
def test_clipping_equals_clip_grad_norm(kind, max_norm):
    model = make_model(kind, layers=8)
    data = batches(6)
    result = train_like_pytorch(model, data, max_grad_norm=max_norm, budget=streaming_budget(model, data[0][0]))
    assert_trained_alike(result)
    if max_norm < 1:
        assert all(n > max_norm for n in result["ref_norms"]), "the small norm must clip every step"
    else:
        assert all(n < max_norm for n in result["ref_norms"])
    result["engine"].close()


def test_clipping_with_accumulation_and_dropout():
    model = make_model("llama", dropout=0.1, layers=8)
    data = batches(12)
    result = train_like_pytorch(model, data, accumulate=3, max_grad_norm=0.1,
                                budget=streaming_budget(model, data[0][0]))
    assert_trained_alike(result)
    result["engine"].close()


def test_a_non_finite_gradient_skips_the_step_and_leaves_everything_untouched():
    model = make_model("gpt", layers=8)
    data = batches(5)
    with pytest.warns(RuntimeWarning, match="skipped"):
        result = train_like_pytorch(model, data, max_grad_norm=1.0, poison={2},
                                    budget=streaming_budget(model, data[0][0]))
    assert not math.isfinite(result["norms"][2])
    assert_trained_alike(result)
    engine = result["engine"]
    assert engine._optimizer.skipped_steps == 1
    assert engine._store.steps[0].item() == 4          # Adam's step count skips the poisoned update too
    engine.close()


def test_grad_norm_is_none_without_clipping():
    model = make_model("gpt", layers=2)
    ids, labels = batches(1)[0]
    engine = ratel.compile(model, budget="1GiB", example_inputs=(ids,), device="cpu", progress=False)
    engine.backward(engine(ids, labels=labels).loss)
    engine.step()
    assert engine.grad_norm is None
    engine.close()


# ---------------------------------------------------------------------------------------------- frozen parameters
def _freeze(model, pattern: str) -> None:
    """LoRA-style (only attention q/v, or the fused qkv), one frozen block, or frozen norms."""
    attention = ("q_proj", "v_proj", "qkv", "c_attn")
    for name, p in model.named_parameters():
        if pattern == "attention_only":
            p.requires_grad_(any(a in name for a in attention))
        elif pattern == "frozen_block":
            p.requires_grad_(".1." not in name)
        elif pattern == "frozen_norms":
            p.requires_grad_(not any(w in name for w in ("norm", "ln_")))


FREEZE = ["attention_only", "frozen_block", "frozen_norms"]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("pattern", FREEZE)
def test_frozen_parameters_under_every_activation_policy(pattern, policy, tmp_path):
    model = make_model("llama", layers=8)
    _freeze(model, pattern)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen
    data = batches(5, batch=1, seq=8)    # small activations: every fixed policy's plan streams parameters
    ssd = {"ssd_dir": str(tmp_path)} if policy == "ssd" else {}
    result = train_like_pytorch(model, data, budget=streaming_budget(model, data[0][0], policy, **ssd),
                                activations=policy)
    assert_trained_alike(result)
    engine = result["engine"]
    state = engine.state_dict()
    for name, value in frozen.items():
        assert torch.equal(state[name], value), f"frozen {name} changed"
    # No gradient staging, optimizer state or host memory beyond the values for frozen groups.
    for g in engine.plan.groups:
        if not g.trainable:
            assert g.index not in engine._store.exp_avg and g.index not in engine._store.grad_staging
    engine.close()


@pytest.mark.parametrize("kind", ["gpt", "gpt2"])
@pytest.mark.parametrize("pattern", FREEZE)
def test_frozen_parameters_other_architectures(kind, pattern):
    model = make_model(kind, dropout=0.1, layers=8)
    _freeze(model, pattern)
    data = batches(5)
    result = train_like_pytorch(model, data, budget=streaming_budget(model, data[0][0], "auto"))
    assert_trained_alike(result)
    result["engine"].close()


def test_peft_lora_model_trains_like_pytorch():
    peft = pytest.importorskip("peft")
    base = make_model("llama", layers=8)
    torch.manual_seed(3)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      lora_dropout=0.0, init_lora_weights="gaussian"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    data = batches(5)
    result = train_like_pytorch(model, data, max_grad_norm=1.0, budget=streaming_budget(model, data[0][0]))
    assert_trained_alike(result)
    engine = result["engine"]
    assert sum(g.numel for g in engine.plan.groups if g.trainable) == sum(
        p.numel() for p in model.parameters() if p.requires_grad)
    engine.close()


# ---------------------------------------------------------------------------------------------- schedules and groups
def test_lambda_lr_schedule_with_per_group_weight_decay():
    model = make_model("llama", layers=8)
    data = batches(6)
    result = train_like_pytorch(model, data, groups=lambda m: no_decay_groups(m, 0.1), lr=3e-3,
                                budget=streaming_budget(model, data[0][0]),
                                scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
                                    opt, lambda s: min(1.0, (s + 1) / 3)))
    assert result["lrs"] == result["ref_lrs"] and len(set(result["lrs"])) == 3
    assert_trained_alike(result)
    assert len(result["engine"].optimizer.param_groups) == 2
    result["engine"].close()


def test_cosine_schedule_with_warmup_and_accumulation():
    model = make_model("gpt2", layers=8)
    data = batches(12)
    result = train_like_pytorch(model, data, accumulate=2, groups=lambda m: no_decay_groups(m, 0.05),
                                budget=streaming_budget(model, data[0][0]),
                                scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6))
    assert result["lrs"] == result["ref_lrs"]
    assert_trained_alike(result)
    result["engine"].close()


def test_engine_lr_sets_every_group():
    model = make_model("gpt", layers=2)
    ids = batches(1)[0][0]
    engine = ratel.compile(model, budget="1GiB", optimizer=torch.optim.AdamW(no_decay_groups(model, 0.1), lr=1e-3),
                           example_inputs=(ids,), device="cpu", progress=False)
    engine.lr = 5e-4
    assert [g["lr"] for g in engine.optimizer.param_groups] == [5e-4, 5e-4] and engine.lr == 5e-4
    engine.close()


def test_unsupported_optimizers_are_refused_with_what_to_do():
    model = make_model("gpt", layers=2)
    ids = batches(1)[0][0]
    with pytest.raises(ratel.RatelError, match="AdamW"):
        ratel.compile(model, budget="1GiB", optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                      example_inputs=(ids,), device="cpu")
    with pytest.raises(ratel.RatelError, match="amsgrad"):
        ratel.compile(model, budget="1GiB", optimizer=torch.optim.AdamW(model.parameters(), amsgrad=True),
                      example_inputs=(ids,), device="cpu")
    some = [p for n, p in model.named_parameters() if "blocks.0" in n]
    with pytest.raises(ratel.RatelError, match="in no optimizer param group"):
        ratel.compile(model, budget="1GiB", optimizer=torch.optim.AdamW(some), example_inputs=(ids,), device="cpu")


# ---------------------------------------------------------------------------------------------- the model object
def test_the_model_object_holds_the_trained_weights():
    transformers = pytest.importorskip("transformers")
    model = make_model("gpt2", layers=8)
    data = batches(5)
    result = train_like_pytorch(model, data, budget=streaming_budget(model, data[0][0]))
    engine, reference = result["engine"], result["reference"]
    state = engine.state_dict()
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), state[name]), name
    ids, labels = data[0]
    with torch.no_grad():
        torch.testing.assert_close(model(ids, labels=labels).loss, reference(ids, labels=labels).loss, rtol=1e-5,
                                   atol=0)
    engine.close()
    for name, p in model.named_parameters():   # still there, in memory of the model's own, after close
        assert torch.equal(p.detach(), state[name]), name


def test_save_pretrained_after_training_saves_the_trained_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = make_model("llama", layers=8)
    data = batches(5)
    result = train_like_pytorch(model, data, budget=streaming_budget(model, data[0][0]))
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    for name, p in result["reference"].named_parameters():
        torch.testing.assert_close(loaded.get_parameter(name), p.detach(), rtol=1e-5, atol=1e-7)
    result["engine"].close()


def test_a_meta_model_cannot_be_used_directly():
    with torch.device("meta"):
        model = make_model("gpt", layers=2, device="meta")
    ids, labels = batches(1)[0]
    engine = ratel.compile(model, budget="1GiB", example_inputs=(ids,), device="cpu", progress=False)
    engine.backward(engine(ids, labels=labels).loss)
    engine.step()
    with pytest.raises(ratel.RatelError, match="engine.state_dict"):
        model(ids)
    with pytest.raises(ratel.RatelError, match="meta device"):
        model.state_dict()
    assert engine(ids, labels=labels).loss.isfinite()   # the engine itself still traces and runs
    engine.close()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_state_dict_loads_strictly_into_a_fresh_model(kind):
    model = make_model(kind, layers=8)
    data = batches(3)
    result = train_like_pytorch(model, data, budget=streaming_budget(model, data[0][0]))
    state = result["engine"].state_dict()
    fresh = make_model(kind, layers=8)
    assert set(state) == set(fresh.state_dict())
    fresh.load_state_dict(state, strict=True)
    for name, p in result["reference"].named_parameters():
        torch.testing.assert_close(fresh.get_parameter(name), p.detach(), rtol=1e-5, atol=1e-7)
    result["engine"].close()


# ---------------------------------------------------------------------------------------------- misuse
def _engine(**kwargs):
    model = make_model("gpt", layers=2)
    ids, labels = batches(1)[0]
    return ratel.compile(model, budget="1GiB", example_inputs=(ids,), device="cpu", progress=False, **kwargs), ids, labels


def test_backward_twice_on_one_loss_is_refused():
    engine, ids, labels = _engine()
    loss = engine(ids, labels=labels).loss
    engine.backward(loss)
    with pytest.raises(ratel.RatelError, match="already called"):
        engine.backward(loss)
    engine.close()


def test_second_backward_without_step_names_accumulate():
    engine, ids, labels = _engine()
    engine.backward(engine(ids, labels=labels).loss)
    loss = engine(ids, labels=labels).loss
    with pytest.raises(ratel.RatelError, match="accumulate="):
        engine.backward(loss)
    engine.close()


def test_use_after_close_is_refused():
    engine, ids, labels = _engine()
    loss = engine(ids, labels=labels).loss
    engine.close()
    for action, what in [(lambda: engine.backward(loss), "backward"), (engine.step, "step"),
                         (engine.state_dict, "state_dict"), (lambda: setattr(engine, "lr", 1e-4), "learning rate"),
                         (lambda: engine(ids, labels=labels), "forward")]:
        with pytest.raises(ratel.RatelError, match=f"(?s){what}.*closed"):
            action()


def test_bad_accumulate_and_max_grad_norm_are_refused():
    for kwargs in ({"accumulate": 0}, {"accumulate": 1.5}, {"max_grad_norm": 0}, {"max_grad_norm": -1.0}):
        with pytest.raises(ValueError):
            _engine(**kwargs)
