"""On a CUDA device: bf16 training equals plain PyTorch mixed precision, within the GPU memory budget."""

import copy

import pytest
import torch

import ratel
from helpers import VOCAB, batches, first_groups_and_parameters, make_model, mixed_precision_reference, train_seeded

pytestmark = pytest.mark.gpu


def _hold_lane_back(monkeypatch, lagging: str) -> None:
    """Make the compute stream (``lagging="compute"``) or the copy's own stream (``"copies"``) sleep before
    every copy Ratel issues: that lane then runs far behind the host, as a large model's kernels make it."""
    from ratel.runtime.memory import Lanes
    original = Lanes.copy

    def copy_late(self, dst, src, stream, after=None, span=None):
        if self.cuda:
            with torch.cuda.stream(torch.cuda.current_stream(self.device) if lagging == "compute" else stream):
                torch.cuda._sleep(2_000_000)
        return original(self, dst, src, stream, after, span)

    monkeypatch.setattr(Lanes, "copy", copy_late)


def _relative_differences(losses, ref_losses, state, ref_masters) -> tuple[float, float, str]:
    """The largest relative difference of a loss, and of a parameter (in norm) with its name, from the
    reference's."""
    loss_diff = max(abs(ours - theirs) / abs(theirs) for ours, theirs in zip(losses, ref_losses))
    param_diff, worst = max((((state[n] - m.detach().cpu()).norm() / m.detach().cpu().norm()).item(), n)
                            for n, m in ref_masters.items())
    return loss_diff, param_diff, worst


# bf16 tolerance: Ratel runs the same kernels as eager PyTorch on the same bf16 values; what can differ is
# the order of floating-point accumulation inside attention backward kernels (atomics), which moves
# bf16 gradients by a few ulp. Measured on the H100 (benchmarks/RESULTS.md): well inside these bounds.
LOSS_RTOL = 5e-3
PARAM_RTOL = 5e-3


@pytest.mark.parametrize("kind,policy", [("gpt", "auto"), ("llama", "auto"), ("gpt2", "auto"), ("gpt", "recompute"),
                                         ("gpt", "keep"), ("llama", "host"), ("gpt2", "host"), ("gpt", "selective"),
                                         ("llama", "selective"), ("gpt2", "selective")])
@pytest.mark.parametrize("resident", [True, False], ids=["the first groups kept on the GPU", "every group streamed"])
def test_bf16_training_equals_pytorch_mixed_precision(kind, policy, resident):
    model = make_model(kind, dropout=0.0, layers=4, dtype=torch.bfloat16)
    data = batches(10, batch=4, seq=32)
    # A model this small gains nothing from resident groups (the plan keeps none): name the first two.
    first, first_parameters = (first_groups_and_parameters(model, data[0][0], 2) if resident
                               else (False, frozenset()))
    ref_losses, ref_masters = mixed_precision_reference(model, data, 1e-3, 0.1, device="cuda",
                                                        on_device=first_parameters)
    engine = ratel.compile(model, budget="2GiB", optimizer=ratel.AdamW(lr=1e-3, weight_decay=0.1),
                           example_inputs=(data[0][0],), device="cuda", progress=False, activations=policy,
                           resident=first)
    assert set(engine.plan.placement.gpu_groups) == set(first or ())
    losses = train_seeded(engine, data)
    state = engine.state_dict()
    engine.close()
    loss_diff, param_diff, worst = _relative_differences(losses, ref_losses, state, ref_masters)
    print(f"\n[{kind} bf16 {policy} resident={resident} on {torch.cuda.get_device_name()}] max loss rel diff {loss_diff:.2e}, "
          f"max parameter rel diff {param_diff:.2e} ({worst})")
    assert loss_diff <= LOSS_RTOL
    assert param_diff <= PARAM_RTOL


@pytest.mark.parametrize("mix", [0.0, 0.5])
def test_peak_gpu_memory_stays_within_a_budget_smaller_than_the_model(mix):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    # (large enough that the smallest plan's fixed per-unit workspace, ~16 MiB each, leaves it below the model)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=1024, intermediate_size=2816,
                                         num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=4,
                                         bos_token_id=0, eos_token_id=0, pad_token_id=0)).to(torch.bfloat16)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(0, VOCAB, (4, 32))
    ratel.detect_hardware("cuda")   # measured once up front: its buffers are not the engine's
    # mix 0: the smallest budget (every unit recomputed); 0.5: halfway to keeping everything (a mixed plan).
    # (every group streamed: the engine then keeps on the GPU what the budget leaves room for)
    low = ratel.explain(model, "1TiB", (ids,), activations="recompute", resident=False).memory.gpu_peak
    high = ratel.explain(model, "1TiB", (ids,), activations="keep", resident=False).memory.gpu_peak
    budget = int(low + mix * (high - low))
    assert budget < model_bytes
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base, base_reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    engine = ratel.compile(model, budget=budget, example_inputs=(ids,), device="cuda", progress=False)
    for ids, labels in batches(3, batch=4, seq=32):
        engine.backward(engine(ids, labels=labels).loss)
        engine.step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    # What the allocator holds, not only what tensors use: fragmentation must not break a plan that fits.
    reserved = torch.cuda.max_memory_reserved() - base_reserved
    engine.close()
    print(f"\n[peak mix={mix}] model {model_bytes} B, budget {budget} B, measured peak {peak} B, reserved {reserved} B")
    assert peak <= budget, f"measured {peak} > budget {budget}"
    assert reserved <= budget, f"reserved {reserved} > budget {budget}"


def test_bf16_with_optimizer_states_on_ssd_equals_pytorch_mixed_precision(tmp_path):
    from ratel.ir import Tier
    from ratel.ir.layout import host_usage
    from ratel.runtime.calibrate import cpu_adam_kernel
    model = make_model("gpt_untied", dropout=0.0, layers=4, dtype=torch.bfloat16)
    data = batches(6, batch=4, seq=32)
    ref_losses, ref_masters = mixed_precision_reference(model, data, 1e-3, 0.1, device="cuda")
    probe = ratel.compile(model, budget="2GiB", example_inputs=(data[0][0],), device="cuda", progress=False,
                          resident=False)
    plan = probe.plan
    probe.close()
    tiers = {g.name: Tier.SSD for g in plan.groups if g.trainable}
    host = sum(b for _, b in host_usage(plan.groups, tiers, plan.placement.activations, (cpu_adam_kernel() == "torch")))
    engine = ratel.compile(model, budget=ratel.Budget(gpu="2GiB", host=host, ssd_dir=str(tmp_path)),
                           optimizer=ratel.AdamW(lr=1e-3, weight_decay=0.1), example_inputs=(data[0][0],),
                           device="cuda", progress=False, resident=False)
    assert any(t == Tier.SSD for _, t in engine.plan.placement.optimizer_tier)
    losses = train_seeded(engine, data)
    state = engine.state_dict()
    assert engine.host_bytes_allocated() <= host
    engine.close()
    assert losses == ref_losses
    for name, master in ref_masters.items():
        assert torch.equal(state[name], master.detach()), name


@pytest.mark.parametrize("resident", [None, False], ids=["resident groups as planned", "every group streamed"])
def test_bf16_accumulation_and_clipping_equal_pytorch_mixed_precision(resident):
    # The reference sums micro-batch gradients in fp32 as Ratel does (bf16 p.grad sums would round
    # differently), and the model has no biases: a key bias has an exactly-zero true gradient, which Adam
    # turns into full-size steps of whatever rounding noise either side has (see tests/test_api.py).
    import copy
    model = make_model("gpt_nobias", layers=4, dtype=torch.bfloat16)
    data = batches(8, batch=4, seq=32)
    ref = copy.deepcopy(model).cuda()
    params = list(ref.parameters())
    masters = [p.detach().float().requires_grad_() for p in params]
    opt = torch.optim.AdamW(masters, lr=1e-3, weight_decay=0.1, fused=True)
    engine = ratel.compile(model, budget="2GiB", optimizer=ratel.AdamW(lr=1e-3, weight_decay=0.1),
                           example_inputs=(data[0][0],), device="cuda", progress=False, accumulate=2,
                           max_grad_norm=0.05, resident=resident)
    losses, ref_losses, norms, ref_norms = [], [], [], []
    for step, (ids, labels) in enumerate(data):
        torch.manual_seed(1000 + step)
        loss = ref(ids.cuda(), labels=labels.cuda()).loss
        (loss / 2).backward()
        ref_losses.append(loss.item())
        for m, p in zip(masters, params):
            m.grad = p.grad.float() if m.grad is None else m.grad + p.grad.float()
            p.grad = None
        torch.manual_seed(1000 + step)
        loss = engine(ids, labels=labels).loss
        engine.backward(loss / 2)
        losses.append(loss.item())
        if step % 2 == 1:
            ref_norms.append(torch.nn.utils.clip_grad_norm_(masters, 0.05).item())
            opt.step()
            opt.zero_grad()
            with torch.no_grad():
                for m, p in zip(masters, params):
                    p.copy_(m)
            engine.step()
            norms.append(engine.grad_norm)
    state = engine.state_dict()
    engine.close()
    names = [n for n, _ in ref.named_parameters()]
    loss_diff = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
    norm_diff = max(abs(a - b) / abs(b) for a, b in zip(norms, ref_norms))
    param_diff = max(((state[n] - m.detach().cpu()).norm() / m.detach().norm().cpu()).item()
                     for n, m in zip(names, masters))
    print(f"\n[gpt bf16 accumulate=2 clip on {torch.cuda.get_device_name()}] loss {loss_diff:.2e}, "
          f"grad norm {norm_diff:.2e}, parameters {param_diff:.2e}")
    assert all(n > 0.05 for n in ref_norms)
    assert loss_diff <= LOSS_RTOL and norm_diff <= LOSS_RTOL and param_diff <= PARAM_RTOL


def test_bf16_resume_on_the_gpu_equals_the_uninterrupted_run(tmp_path):
    # Dropout draws from the CUDA generator: the checkpoint must put it back as it was, with the states on SSD.
    from helpers import host_minimum, train_steps as run
    model = make_model("gpt_untied", dropout=0.1, layers=4, dtype=torch.bfloat16)
    data = batches(6, batch=4, seq=32)
    host = host_minimum(model, data[0][0], device="cuda", gpu="2GiB")
    (tmp_path / "swap").mkdir()

    def build(resume=None):
        # A fresh copy each time: after close() the model passed to compile holds the trained weights.
        return ratel.compile(copy.deepcopy(model), budget=ratel.Budget(gpu="2GiB", host=host, ssd_dir=str(tmp_path / "swap")),
                             optimizer=ratel.AdamW(lr=1e-3, weight_decay=0.1), example_inputs=(data[0][0],),
                             device="cuda", progress=False, resume=resume)

    engine = build()
    torch.cuda.manual_seed(7)            # after compile: planning draws from the generator too
    whole = run(engine, data)
    final = engine.state_dict()
    engine.close()
    engine = build()
    torch.cuda.manual_seed(7)
    first = run(engine, data[:3])
    engine.save(tmp_path / "ckpt")
    engine.close()
    torch.cuda.manual_seed(123)          # whatever was drawn before: the checkpoint's state wins
    engine = build(resume=tmp_path / "ckpt")
    rest = run(engine, data[3:])
    state = engine.state_dict()
    engine.close()
    assert first + rest == whole
    for name, value in final.items():
        assert torch.equal(state[name], value), name


def test_the_stand_in_for_cuda_attention_measures_what_cuda_allocates(monkeypatch):
    """Plans for CUDA made on a machine without one measure attention with a stand-in for CUDA's fused
    kernels (estimate_costs); on a GPU, the same unit measured with fake CUDA tensors (sdpa picks its real
    backend) must agree, or plans made on a laptop would be wrong for the card."""
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(vocab_size=VOCAB, n_embd=256, n_layer=2, n_head=4, n_positions=512, bos_token_id=0,
                        eos_token_id=0)
    model = GPT2LMHeadModel(config).to(torch.bfloat16).train()
    ids = torch.randint(0, VOCAB, (4, 512))

    def block():
        plan = ratel.explain(model, "1TiB", (ids,), device="cuda", activations="keep")
        return plan.costs.units[1]   # embed, block, head
    real = block()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    stand_in = block()
    print(f"\n[attention profile] cuda saved {real.saved_bytes} bwd {real.bwd_workspace}; "
          f"stand-in saved {stand_in.saved_bytes} bwd {stand_in.bwd_workspace}")
    assert stand_in.saved_bytes == pytest.approx(real.saved_bytes, rel=0.05)
    assert stand_in.bwd_workspace == pytest.approx(real.bwd_workspace, rel=0.10)


def test_a_meta_model_compiled_for_cuda_is_initialised_on_the_gpu_as_its_initialiser_says(tmp_path, monkeypatch):
    """The initialiser runs on the GPU (the CPU draws random numbers on one thread: minutes at 13B): the same
    distributions, the same values for the same seed — also when the first compile measures the machine
    (an empty hardware cache), which draws random numbers of its own."""
    from ratel.models import GPT, GPTConfig
    from ratel.runtime import calibrate
    monkeypatch.setattr(calibrate, "CACHE", tmp_path / "hardware.json")

    def initialised():
        with torch.device("meta"):
            model = GPT(GPTConfig(vocab_size=VOCAB, n_layer=2, n_head=4, d_model=256, max_seq_len=64))
        torch.manual_seed(7)
        engine = ratel.compile(model, budget="1GiB", example_inputs=(torch.randint(0, VOCAB, (2, 16)),),
                               device="cuda", progress=False)
        state = engine.state_dict()
        engine.close()
        return state
    first, second = initialised(), initialised()
    for name, value in first.items():
        assert torch.equal(value, second[name]), name
        if name.endswith("weight") and value.ndim == 2:
            assert value.std().item() == pytest.approx(0.02, rel=0.05), name
        elif name.endswith("bias"):
            assert not value.any(), name
        elif "ln" in name:
            assert (value == 1).all(), name


def test_resident_and_streamed_groups_on_the_gpu_train_like_pytorch_and_write_the_model_back():
    """The first two groups named resident: those stay on the GPU (fused AdamW there, the D2H write-back
    to the model's copy on its own stream), the rest stream; the model passed to compile holds the weights."""
    model = make_model("gpt_untied", layers=4, dtype=torch.bfloat16)
    data = batches(6, batch=4, seq=32)
    # (a model this small gains nothing: the plan would keep none)
    first, first_parameters = first_groups_and_parameters(model, data[0][0], 2)
    ref_losses, ref_masters = mixed_precision_reference(model, data, 1e-3, 0.1, device="cuda",
                                                        on_device=first_parameters)
    engine = ratel.compile(model, budget="2GiB", optimizer=ratel.AdamW(lr=1e-3, weight_decay=0.1),
                           example_inputs=(data[0][0],), device="cuda", progress=False, activations="recompute",
                           resident=first)
    on_gpu = list(engine.plan.placement.gpu_groups)
    assert sorted(on_gpu) == sorted(first) and len(on_gpu) < len(engine.plan.groups)
    losses = []
    for step, (ids, labels) in enumerate(data):
        torch.manual_seed(1000 + step)
        loss = engine(ids, labels=labels).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        state = engine.state_dict()
        for name, p in model.named_parameters():      # current after every step(), not only at the end
            assert torch.equal(p.detach().cpu(), state[name].to(torch.bfloat16)), (step, name)
    engine.close()
    loss_diff, param_diff, worst = _relative_differences(losses, ref_losses, state, ref_masters)
    print(f"\n[resident {on_gpu}] max loss rel diff {loss_diff:.2e}, max parameter rel diff {param_diff:.2e} ({worst})")
    assert loss_diff <= LOSS_RTOL and param_diff <= PARAM_RTOL


@pytest.mark.parametrize("policy", ["host", "auto"])
@pytest.mark.parametrize("lagging", ["compute", "copies"])
def test_training_equals_pytorch_when_one_lane_runs_far_behind_the_host(monkeypatch, lagging, policy):
    """Streams make a race between the lanes a matter of timing: a tiny model's kernels finish before the host
    queues the next, so the tests above can pass on unsynchronised code. Here the compute stream (or the copy
    streams) sleeps before every copy: each lane sees the others' work arrive as late as it can, and any copy
    that relies on timing instead of events or on memory another lane still uses changes the result."""
    _hold_lane_back(monkeypatch, lagging)
    model = make_model("gpt_untied", layers=4, dtype=torch.bfloat16)
    data = batches(4, batch=4, seq=64)
    first, first_parameters = first_groups_and_parameters(model, data[0][0], 2)
    ref_losses, ref_masters = mixed_precision_reference(model, data, 1e-3, 0.1, device="cuda",
                                                        on_device=first_parameters)
    engine = ratel.compile(model, budget="2GiB", optimizer=ratel.AdamW(lr=1e-3, weight_decay=0.1),
                           example_inputs=(data[0][0],), device="cuda", progress=False, activations=policy,
                           resident=first)
    losses = train_seeded(engine, data)
    state = engine.state_dict()
    engine.close()
    loss_diff, param_diff, worst = _relative_differences(losses, ref_losses, state, ref_masters)
    print(f"\n[{lagging} lagging, {policy}] max loss rel diff {loss_diff:.2e}, "
          f"max parameter rel diff {param_diff:.2e} ({worst})")
    assert loss_diff <= LOSS_RTOL and param_diff <= PARAM_RTOL


_SANITIZED_STEPS = """
import sys, torch, ratel
sys.path.insert(0, {tests!r})
from helpers import batches, first_groups, make_model
model = make_model("gpt_untied", layers=2, dtype=torch.bfloat16)
data = batches(2, batch=2, seq=32)
engine = ratel.compile(model, budget="2GiB", optimizer=ratel.AdamW(lr=1e-3), example_inputs=(data[0][0],),
                       device="cuda", progress=False, activations={policy!r},
                       resident=first_groups(model, data[0][0], 1))
for ids, labels in data:
    loss = engine(ids, labels=labels).loss
    engine.backward(loss)
    engine.step()
print("parameters finite:", all(torch.isfinite(p).all() for p in engine.state_dict().values()))
engine.close()
"""


@pytest.mark.parametrize("policy", ["host", "recompute"])
def test_torch_stream_sanitizer_finds_no_unsynchronised_access_in_two_training_steps(policy):
    """PyTorch's CUDA Stream Sanitizer (CSAN) checks every kernel's reads and writes of a live tensor against
    the events that order the streams: a value read on one lane before another lane's write is known done
    fails the run, whatever the timing. (It does not see memory a freed tensor leaves to the next one: the
    test above covers that.)"""
    import os
    import subprocess
    import sys
    script = _SANITIZED_STEPS.format(tests=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), policy=policy)
    # Units untimed: under the sanitizer every kernel goes through Python, and the times would price nothing.
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "TORCH_CUDA_SANITIZER": "1", "RATEL_MEASURE_UNITS": "0"})
    output = proc.stdout + proc.stderr
    assert "CSAN detected" not in output, output[-6000:]
    assert proc.returncode == 0, output[-6000:]
    assert "parameters finite: True" in proc.stdout


def test_a_new_input_shape_waits_for_the_kernels_of_the_shape_before_it(monkeypatch):
    """Every program (one per input shape) streams weights through the same ring of GPU slots. An inference
    forward returns with its kernels still queued; a training forward of another shape right after must not
    copy weights into a slot those kernels still read. The compute stream is held back to make that likely."""
    _hold_lane_back(monkeypatch, "compute")
    model = make_model("gpt_untied", layers=4, dtype=torch.bfloat16)
    short, long = batches(1, batch=2, seq=32)[0][0], batches(1, batch=2, seq=64, seed=2)[0][0]
    with torch.no_grad():
        expected = copy.deepcopy(model).cuda()(short.cuda()).logits.float().cpu()
    engine = ratel.compile(model, budget="2GiB", optimizer=ratel.AdamW(lr=1e-3), example_inputs=(long,),
                           device="cuda", progress=False, resident=False)
    with torch.no_grad():
        logits = engine(short).logits            # returns with its kernels queued behind the sleeps
    engine.backward(engine(long, labels=long).loss)  # another program: its first fetches reuse the slots
    got = logits.float().cpu()
    engine.step()
    engine.close()
    assert torch.allclose(got, expected, rtol=LOSS_RTOL, atol=1e-2), (got - expected).abs().max()


def test_the_profile_measures_copies_and_the_cpu_adamw_side_by_side():
    """Host DRAM is shared by the copies and the CPU AdamW: measured together, neither is faster than alone
    (allowing the noise of two short measurements), and both were measured (the copies outlast updates)."""
    from ratel.runtime.calibrate import measure_cuda
    hw = measure_cuda(torch.device("cuda"))
    assert hw.shares_host_dram
    assert 0 < hw.h2d_shared_gbps <= hw.h2d_gbps * 1.1
    assert 0 < hw.cpu_adam_shared_gparams <= hw.cpu_adam_gparams * 1.1
