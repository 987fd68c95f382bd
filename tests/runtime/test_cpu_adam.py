"""CPU AdamW (ratel/runtime/cpu_adam.py, csrc/adam): same numbers as torch, on every ISA and thread count.

Reference points, from strict to loose:
  * every native ISA and thread count: bit-identical to each other;
  * native vs the torch backend (torch._fused_adamw_ on grad.float()): bit-identical except in torch's own
    scalar tail (the last numel % 16 elements), which rounds exp_avg_sq differently (1 ulp per step).
    This holds for torch's AVX2/AVX-512 kernels (x86); torch's portable kernel (ATEN_CPU_CAPABILITY=default,
    or other architectures) skips the FMAs, so there only closeness is checked;
  * both vs torch.optim.AdamW (non-fused): relative difference < 1e-6;
  * the bf16/fp16 copy: exactly master.to(dtype), special values included.
"""
import pytest
import torch

import ratel
from ratel.runtime import cpu_adam
from ratel.runtime.cpu_adam import adamw_step

HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
needs_native = pytest.mark.skipif(not cpu_adam.native_available(), reason="ratel._adam is not built")
ISAS = cpu_adam._native.supported_isas() if cpu_adam.native_available() else []
VECTOR = 16  # torch's AVX-512 loop width; elements past the last multiple of it run torch's scalar tail
# Whether torch's fused AdamW runs its x86 vector kernel, whose rounding the native kernel reproduces exactly.
TORCH_X86_KERNEL = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def make_state(numel, grad_dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    master = torch.randn(numel, generator=gen)
    exp_avg = torch.randn(numel, generator=gen) * 1e-3
    exp_avg_sq = torch.rand(numel, generator=gen) * 1e-6
    grads = [(torch.randn(numel, generator=gen) * 1e-2).to(grad_dtype) for _ in range(3)]
    return master, exp_avg, exp_avg_sq, grads


def run_steps(backend, numel, *, grad_dtype=torch.float32, out_dtype=None, weight_decay=0.1, seed=0, **kwargs):
    """Three steps from the same start; returns (master, exp_avg, exp_avg_sq, out)."""
    master, exp_avg, exp_avg_sq, grads = make_state(numel, grad_dtype, seed)
    out = None if out_dtype is None else torch.empty(numel, dtype=out_dtype)
    hyper = {**HYPER, "weight_decay": weight_decay, **kwargs}
    for step, grad in enumerate(grads, start=1):
        adamw_step(master, grad, exp_avg, exp_avg_sq, step, out=out, backend=backend, **hyper)
    return master, exp_avg, exp_avg_sq, out


def assert_equal_but_torch_tail(native, reference):
    if not TORCH_X86_KERNEL:
        scale = float(reference.abs().max()) if reference.numel() else 0.0
        torch.testing.assert_close(native, reference, rtol=1e-5, atol=1e-6 * scale)
        return
    body = native.numel() - native.numel() % VECTOR
    assert torch.equal(native[:body], reference[:body])
    # torch's tail rounds exp_avg_sq differently by up to 1 ulp per step; over 3 steps that compounds.
    torch.testing.assert_close(native[body:], reference[body:], rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", ["torch", pytest.param("native", marks=needs_native)])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_torch_optim_adamw(backend, weight_decay):
    numel = 4099
    master, _, _, grads = make_state(numel)
    exp_avg, exp_avg_sq = torch.zeros(numel), torch.zeros(numel)  # torch.optim starts from zero moments
    param = torch.nn.Parameter(master.clone())
    optimizer = torch.optim.AdamW([param], weight_decay=weight_decay, foreach=False, **{
        "lr": HYPER["lr"], "betas": (HYPER["beta1"], HYPER["beta2"]), "eps": HYPER["eps"]})
    for step, grad in enumerate(grads, start=1):
        param.grad = grad.clone()
        optimizer.step()
        adamw_step(master, grad, exp_avg, exp_avg_sq, step, backend=backend, weight_decay=weight_decay, **HYPER)
    state = optimizer.state[param]
    # NOTE: torch.optim.AdamW (foreach=False) is itself not reproducible bit for bit: in about 1 fresh process
    # in 20 it rounds ~4% of the parameters 1 ulp differently (seen with torch 2.13 CPU, same inputs). atol
    # covers that ulp on parameters near zero, where a relative tolerance means nothing.
    for ours, theirs in [(master, param.detach()), (exp_avg, state["exp_avg"]), (exp_avg_sq, state["exp_avg_sq"])]:
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-8)


@needs_native
@pytest.mark.parametrize("numel", [0, 1, 15, 16, 17, 4096 + 7, (1 << 20) + 3])  # the last one streams `out`
@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_native_equals_torch_backend(numel, grad_dtype):
    native = run_steps("native", numel, grad_dtype=grad_dtype, out_dtype=torch.bfloat16)
    reference = run_steps("torch", numel, grad_dtype=grad_dtype, out_dtype=torch.bfloat16)
    for ours, theirs in zip(native[:3], reference[:3]):
        assert_equal_but_torch_tail(ours, theirs)
    assert torch.equal(native[3], native[0].to(torch.bfloat16))


@needs_native
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("grad_scale", [1.0, 0.37])
@pytest.mark.parametrize("beta1", [0.9, 0.3])  # 0.3 takes torch's other lerp formula (weight >= 0.5)
def test_native_equals_torch_backend_hyperparameters(weight_decay, grad_scale, beta1):
    kwargs = dict(grad_dtype=torch.bfloat16, weight_decay=weight_decay, grad_scale=grad_scale, beta1=beta1)
    native = run_steps("native", 1000, **kwargs)
    reference = run_steps("torch", 1000, **kwargs)
    for ours, theirs in zip(native[:3], reference[:3]):
        assert_equal_but_torch_tail(ours, theirs)


@needs_native
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_every_isa_and_thread_count_gives_the_same_bits(out_dtype):
    numel = 3 * (1 << 15) + 77  # enough elements to split over 3 threads, with a ragged tail
    results = []
    for isa in ISAS:
        for threads in (1, 3):
            results.append(run_steps("native", numel, grad_dtype=torch.float16, out_dtype=out_dtype,
                                     grad_scale=0.5, isa=isa, num_threads=threads))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a.view(torch.int16) if a.dtype != torch.float32 else a,
                               b.view(torch.int16) if b.dtype != torch.float32 else b)


def special_floats(numel, seed=0):
    """Random bit patterns (NaNs, infinities, subnormals, huge values) plus the rounding edge cases."""
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(-2**31, 2**31 - 1, (numel,), generator=gen, dtype=torch.int64).to(torch.int32)
    edges = torch.tensor([0x00000000, 0x80000000, 0x00000001, 0x807FFFFF, 0x3F808000, 0x3F818000, 0x3F808001,
                          0x7F7FFFFF, 0x7F800000, 0xFF800000, 0x7F800001, 0xFFC00000, 0x477FEFFF, 0x477FF000,
                          0x33000000, 0x33000001, 0x387FE000, 0x38800000], dtype=torch.int64).to(torch.int32)
    bits[:edges.numel()] = edges
    return bits.view(torch.float32)


@needs_native
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("numel", [37, (1 << 20) + 5])
def test_out_equals_master_rounded_for_special_values(out_dtype, numel):
    # lr = 0, zero moments and no weight decay leave master as it is, so `out` is a pure conversion test.
    master = special_floats(numel)
    expected = master.to(out_dtype)
    nan = torch.isnan(master)
    for isa in ISAS:
        out = torch.empty(numel, dtype=out_dtype)
        adamw_step(master, torch.zeros(numel, dtype=torch.bfloat16), torch.zeros(numel), torch.zeros(numel), 1,
                   lr=0.0, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, out=out, backend="native", isa=isa)
        assert torch.equal(out.view(torch.int16)[~nan], expected.view(torch.int16)[~nan]), isa
        # NaN payloads: bf16 NaN is 0xFFFF and fp16 keeps vcvtps2ph's payload, as torch's x86 kernels write
        # them (its portable kernel writes other NaNs); any NaN must stay a NaN.
        assert bool(torch.isnan(out[nan]).all()), isa
        if TORCH_X86_KERNEL:
            assert torch.equal(out.view(torch.int16), expected.view(torch.int16)), isa


@needs_native
def test_fp16_grad_special_values_convert_exactly():
    # A gradient is read as float(grad); with beta1 = 0 and lr = 0, exp_avg ends up as exactly that value.
    grad = special_floats(4096, seed=3).to(torch.float16)
    finite = torch.isfinite(grad)
    for isa in ISAS:
        exp_avg = torch.zeros(grad.numel())
        adamw_step(torch.zeros(grad.numel()), grad, exp_avg, torch.zeros(grad.numel()), 1, lr=0.0, beta1=0.0,
                   beta2=0.999, eps=1e-8, weight_decay=0.0, backend="native", isa=isa)
        assert torch.equal(exp_avg[finite], grad.float()[finite]), isa


@needs_native
def test_grad_is_not_modified():
    grad = torch.randn(1000).to(torch.bfloat16)
    before = grad.clone()
    run = make_state(1000)
    adamw_step(run[0], grad, run[1], run[2], 1, weight_decay=0.1, grad_scale=0.5, backend="native", **HYPER)
    adamw_step(run[0], grad, run[1], run[2], 2, weight_decay=0.1, grad_scale=0.5, backend="torch", **HYPER)
    assert torch.equal(grad, before)


def test_auto_falls_back_to_torch_without_the_extension(monkeypatch):
    monkeypatch.setattr(cpu_adam, "_native", None)
    assert not cpu_adam.native_available()
    assert run_steps("auto", 100) is not None
    master, exp_avg, exp_avg_sq, grads = make_state(10)
    assert adamw_step(master, grads[0], exp_avg, exp_avg_sq, 1, weight_decay=0.0, **HYPER) == "torch"
    with pytest.raises(RuntimeError, match="not built"):
        adamw_step(master, grads[0], exp_avg, exp_avg_sq, 1, weight_decay=0.0, backend="native", **HYPER)


@needs_native
def test_auto_picks_native_with_a_simd_kernel():
    master, exp_avg, exp_avg_sq, grads = make_state(10)
    ran = adamw_step(master, grads[0], exp_avg, exp_avg_sq, 1, weight_decay=0.0, **HYPER)
    expected = "native" if cpu_adam.native_isa() in ("avx512", "avx2") else "torch"
    assert ran.startswith(expected)


def bad_call(**overrides):
    args = dict(master=torch.zeros(8), grad=torch.zeros(8, dtype=torch.bfloat16), exp_avg=torch.zeros(8),
                exp_avg_sq=torch.zeros(8), step=1, out=None, backend="auto")
    args.update(overrides)
    adamw_step(args.pop("master"), args.pop("grad"), args.pop("exp_avg"), args.pop("exp_avg_sq"), args.pop("step"),
               weight_decay=0.0, **args, **HYPER)


@pytest.mark.parametrize("overrides, error, message", [
    (dict(master=torch.zeros(8, dtype=torch.bfloat16)), TypeError, "master must have dtype torch.float32"),
    (dict(grad=torch.zeros(8, dtype=torch.int32)), TypeError, "grad must have dtype"),
    (dict(exp_avg_sq=torch.zeros(8, dtype=torch.float64)), TypeError, "exp_avg_sq must have dtype"),
    (dict(out=torch.zeros(8)), TypeError, "out must have dtype torch.bfloat16, torch.float16"),
    (dict(grad=[0.0] * 8), TypeError, "grad must be a torch.Tensor"),
    (dict(grad=torch.zeros(9, dtype=torch.bfloat16)), ValueError, "grad has 9 elements, master has 8"),
    (dict(exp_avg=torch.zeros(4)), ValueError, "exp_avg has 4 elements"),
    (dict(out=torch.zeros(7, dtype=torch.bfloat16)), ValueError, "out has 7 elements"),
    (dict(master=torch.zeros(16)[::2]), ValueError, "master must be contiguous"),
    (dict(grad=torch.zeros(4, 2, dtype=torch.bfloat16).t()), ValueError, "grad must be contiguous"),
    (dict(exp_avg=torch.zeros(8, device="meta")), ValueError, "exp_avg must be on the CPU"),
    (dict(step=0), ValueError, "step must be an int >= 1"),
    (dict(step=1.0), ValueError, "step must be an int >= 1"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
])
def test_errors_name_the_argument(overrides, error, message):
    with pytest.raises(error, match=message):
        bad_call(**overrides)


@needs_native
def test_unknown_isa_is_refused():
    with pytest.raises(ValueError, match="unknown ISA"):
        bad_call(backend="native", isa="neon")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("numel", [1, 63, 100_003])
def test_accumulate_gives_the_bits_of_torch_add_and_copy(dtype, numel):
    from ratel.runtime.cpu_adam import accumulate_
    grad = torch.randn(numel).to(dtype)
    acc = torch.randn(numel)
    expected = acc.clone().add_(grad)
    accumulate_(acc, grad, copy=False, num_threads=2)
    assert torch.equal(acc, expected)
    accumulate_(acc, grad, copy=True, num_threads=2)
    assert torch.equal(acc, grad.float())


def test_the_optimizer_leaves_one_core_to_the_training_thread(monkeypatch):
    monkeypatch.delenv(cpu_adam.THREADS_ENV, raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    assert cpu_adam.optimizer_threads() == 15
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert cpu_adam.optimizer_threads() == 1          # never none
    monkeypatch.setattr(cpu_adam.os, "cpu_count", lambda: 16)
    assert cpu_adam.optimizer_threads(ranks_on_host=2) == 7     # torchrun's one thread a rank: the cores shared


def test_the_user_sets_the_optimizer_threads_and_a_bad_value_is_refused(monkeypatch):
    monkeypatch.setenv(cpu_adam.THREADS_ENV, "3")
    assert cpu_adam.optimizer_threads() == 3 and cpu_adam.optimizer_threads(ranks_on_host=4) == 3
    monkeypatch.setenv(cpu_adam.THREADS_ENV, "0")
    with pytest.raises(ratel.RatelError, match="RATEL_OPTIMIZER_THREADS='0'"):
        cpu_adam.optimizer_threads()
