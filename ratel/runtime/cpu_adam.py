"""CPU AdamW for one unit's flat buffers: the update the runtime runs while the GPU continues backward.

The math is torch.optim.AdamW (amsgrad=False, maximize=False), done in the order of torch's fused CPU kernel
(``torch._fused_adamw_``, aten/src/ATen/native/cpu/FusedAdamKernel.cpp), in fp32, element by element::

    g  = float(grad) * grad_scale                     # grad may be bf16 / fp16 / fp32
    p  = p * (1 - lr * weight_decay)                  # decoupled weight decay, skipped when weight_decay == 0
    m  = fma(w, g - m, m)         with w = 1 - beta1  # torch's lerp_(g, w); for |w| >= 0.5: fma(w - 1, g - m, g)
    v  = fma((1 - beta2) * g, g, v * beta2)
    p  = p + (-lr / (1 - beta1**step)) * m / (sqrt(v) / sqrt(1 - beta2**step) + eps)
    out = bf16(p) or fp16(p)                           # round to nearest even, optional

The step constants are computed in double and rounded to float as torch does. Result: the native kernel
equals ``torch._fused_adamw_`` on ``grad.float()`` bit for bit (torch's AVX2/AVX-512 kernels, i.e. any
x86-64 torch build on a CPU with AVX2), except in torch's own scalar tail (the last ``numel % 16`` elements,
where GCC compiled ``v*beta2 + ...`` differently) where exp_avg_sq may differ by 1 ulp. Against
``torch.optim.AdamW`` (non-fused) both differ by a few ulp at most (relative difference < 1e-6).

Two backends do this update:

* ``"native"``: ``ratel._adam`` (csrc/adam). One pass over memory: reads the 2-byte gradient and 12 bytes of
  state, writes 12 bytes of state and the 2-byte compute copy: 28 bytes per parameter. AVX-512 or AVX2 is
  picked at run time from CPUID; every ISA gives the same bits (the scalar kernel is the reference).
* ``"torch"``: ``grad.float()`` (a new fp32 tensor), ``torch._fused_adamw_``, ``out.copy_(master)``: three
  passes, 40 bytes per parameter plus page faults on the fresh fp32 gradient.

The update is memory bound, and on the GPU machine it shares memory bandwidth with the PCIe copies, so
bytes per parameter decide it. Measured (benchmarks/optimizer.py, dev VM, 2 threads, 64M parameters): the
native full update runs at 1.43 Gparams/s against 0.42 for the torch path (3.4x) and 0.73 for the torch path
with a preallocated fp32 gradient (2.0x); on fp32 gradients without the copy, native and
``torch._fused_adamw_`` are at parity (same job, same bytes). So ``"auto"`` picks native when the extension
is built and has a SIMD kernel for this CPU (``_NATIVE_IS_FASTER`` has the figures); otherwise torch.

NOTE: ``num_threads`` defaults to ``torch.get_num_threads()`` read in the *calling* thread. With torch's
OpenMP backend that is a per-thread setting: a worker thread that never called ``torch.set_num_threads``
sees the process default, so the runtime should pass ``num_threads`` explicitly from its optimizer thread.
"""
from __future__ import annotations

import operator
import os

import torch

from ratel.errors import RatelError

try:
    from ratel import _adam as _native
except ImportError:  # not built (pure-Python install, CI without a compiler): the torch path still works
    _native = None

__all__ = ["accumulate_", "adamw_step", "native_available", "native_isa", "optimizer_threads", "BACKENDS"]

BACKENDS = ("auto", "native", "torch")
THREADS_ENV = "RATEL_OPTIMIZER_THREADS"

_GRAD_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_OUT_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}

# Decided by benchmarks/optimizer.py (full tables in benchmarks/RESULTS.md). Same process, same buffers,
# 64M parameters, median Gparams/s, dev VM (Intel Xeon family 6 model 207, KVM, 2 vCPUs, AVX-512, torch 2.13):
#                                   1 thread   2 threads
#   native, bf16 grad + bf16 copy     0.85       1.43
#   torch path (grad.float() ...)     0.27       0.42    -> native 3.2-3.4x
#   torch path, preallocated fp32     0.41       0.73    -> native 2.0x (the win of fusing, without page faults)
#   native, fp32 grad, no copy        0.80       1.32
#   torch._fused_adamw_ alone         0.78       1.36    -> parity: same job, same 28 B/param
# The native kernel moves 28 B/param against the torch path's 40 B plus page faults, so it wins wherever the
# update is memory bound; a fixed decision keeps runs deterministic (no timing-dependent dispatch).
# Without a SIMD kernel (no AVX2) the native scalar reference calls libm fmaf per element, so torch is used.
# TODO(measure): rerun on the GPU machine (16 cores, torch 2.11) and add its row here.
_NATIVE_IS_FASTER = True
_SIMD_ISAS = ("avx512", "avx2")


def optimizer_threads(ranks_on_host: int = 1) -> int:
    """Threads for the CPU AdamW that runs beside training: the training thread's count (with several ranks
    on this host, its cores shared among them, at least that), less one core left to the training thread.

    Why one less: the update overlaps the backward, whose thread must keep launching kernels (on a GPU) or
    computing (on the CPU). With as many optimizer threads as cores, two OpenMP teams spin on the same cores:
    on the 2-core VM a step of the main job's model took 110-115 ms with 2 optimizer threads and 76-84 ms with
    1, the same losses (benchmarks/optimizer_threads.py); the update itself is memory bound, so one core fewer
    costs it little on a large host (16 threads 5.6, 8 threads 4.0 Gparams/s on the GPU host, benchmarks/RESULTS.md).
    ``RATEL_OPTIMIZER_THREADS`` sets the count instead (a machine shared with other work)."""
    chosen = os.environ.get(THREADS_ENV, "").strip()
    if chosen:
        if not chosen.isdigit() or int(chosen) < 1:
            raise RatelError(f"{THREADS_ENV}={chosen!r}: give a whole number of threads, 1 or more")
        return int(chosen)
    threads = torch.get_num_threads()
    if ranks_on_host > 1:
        threads = max(threads, (os.cpu_count() or 1) // ranks_on_host)
    return max(1, threads - 1)


def native_available() -> bool:
    """Whether the ``ratel._adam`` extension is built and importable."""
    return _native is not None


def native_isa() -> str | None:
    """The ISA the native kernel runs here ("avx512", "avx2" or "scalar"), or None when not built."""
    return _native.supported_isas()[0] if _native is not None else None


def _auto_backend() -> str:
    if _native is not None and _NATIVE_IS_FASTER and native_isa() in _SIMD_ISAS:
        return "native"
    return "torch"


def _check_tensor(name: str, t, dtypes: dict, numel: int | None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"adamw_step: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"adamw_step: {name} must have dtype {allowed}; got {t.dtype}")
    if t.device.type != "cpu":
        raise ValueError(f"adamw_step: {name} must be on the CPU (pinned or not); got device {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"adamw_step: {name} must be contiguous; got shape {tuple(t.shape)} "
                         f"with strides {t.stride()}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"adamw_step: {name} has {t.numel()} elements, master has {numel}")


def _check_args(master, grad, exp_avg, exp_avg_sq, step, out) -> None:
    fp32 = {torch.float32: "float32"}
    _check_tensor("master", master, fp32, None)
    n = master.numel()
    _check_tensor("grad", grad, _GRAD_DTYPES, n)
    _check_tensor("exp_avg", exp_avg, fp32, n)
    _check_tensor("exp_avg_sq", exp_avg_sq, fp32, n)
    if out is not None:
        _check_tensor("out", out, _OUT_DTYPES, n)
    try:
        valid = not isinstance(step, bool) and operator.index(step) >= 1  # ints, numpy ints; not 1.0
    except TypeError:
        valid = False
    if not valid:
        raise ValueError(f"adamw_step: step must be an int >= 1 (already incremented); got {step!r}")


def adamw_step(master: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
               step: int, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
               out: torch.Tensor | None = None, grad_scale: float = 1.0, backend: str = "auto",
               num_threads: int | None = None, isa: str = "auto") -> str:
    """One AdamW step on a flat buffer, in place; returns what ran ("native-avx512", "torch", ...).

    master, exp_avg, exp_avg_sq: fp32, contiguous, same numel (any shape), updated in place.
    grad: bf16, fp16 or fp32 with the same numel; never modified. Multiplied by ``grad_scale`` first.
    step: the step number, already incremented (1 for the first update).
    out: optional bf16/fp16 tensor that receives the updated master rounded to nearest even (the compute
        copy for the GPU), exactly what ``master.to(out.dtype)`` gives.
    backend: "native", "torch" or "auto" (see the module docstring).
    num_threads: native threads; default ``torch.get_num_threads()`` (the torch backend uses torch's pool).
    isa: native only: "auto" or a name from ``ratel._adam.supported_isas()``, for tests and benchmarks.
    """
    if backend not in BACKENDS:
        raise ValueError(f"adamw_step: backend must be one of {BACKENDS}; got {backend!r}")
    _check_args(master, grad, exp_avg, exp_avg_sq, step, out)
    step = operator.index(step)
    if backend == "auto":
        backend = _auto_backend()
    if backend == "native":
        if _native is None:
            raise RuntimeError("adamw_step: backend='native' but ratel._adam is not built "
                               "(pip install --no-build-isolation -e .)")
        threads = torch.get_num_threads() if num_threads is None else int(num_threads)
        # The tensors stay referenced by this frame until the call returns, so the addresses stay valid.
        ran = _native.adamw_step(
            master.data_ptr(), grad.data_ptr(), _GRAD_DTYPES[grad.dtype], exp_avg.data_ptr(),
            exp_avg_sq.data_ptr(), master.numel(), step, float(lr), float(beta1), float(beta2), float(eps),
            float(weight_decay), float(grad_scale), 0 if out is None else out.data_ptr(),
            "none" if out is None else _OUT_DTYPES[out.dtype], threads, isa)
        return f"native-{ran}"
    fused_adamw_step(master, grad, exp_avg, exp_avg_sq, step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                weight_decay=weight_decay, out=out, grad_scale=grad_scale)
    return "torch"


@torch.no_grad()
def fused_adamw_step(master, grad, exp_avg, exp_avg_sq, step, *, lr, beta1, beta2, eps, weight_decay, out,
                     grad_scale) -> None:
    """torch's fused AdamW on an fp32 copy of the gradient, then a rounding copy: the CPU baseline, and the
    update of groups resident on the GPU (tensors of any one device)."""
    g32 = grad.view(-1).float()  # a new tensor unless grad is already fp32
    if grad_scale != 1.0:
        # Multiply rather than pass torch's grad_scale (which divides and writes the result back into grad)
        # so both backends compute the same float(grad) * float(grad_scale) and grad stays untouched.
        g32 = g32.mul_(grad_scale) if g32.data_ptr() != grad.data_ptr() else g32.mul(grad_scale)
    # torch reads the step as float; exact for any step below 2**24.
    step_tensor = torch.full((), float(step), dtype=torch.float32, device=master.device)
    torch._fused_adamw_([master.view(-1)], [g32], [exp_avg.view(-1)], [exp_avg_sq.view(-1)], [], [step_tensor],
                        lr=float(lr), beta1=float(beta1), beta2=float(beta2), weight_decay=float(weight_decay),
                        eps=float(eps), amsgrad=False, maximize=False)
    if out is not None:
        out.view(-1).copy_(master.view(-1))


def accumulate_(acc: torch.Tensor, grad: torch.Tensor, copy: bool, num_threads: int | None = None) -> None:
    """``acc.copy_(grad)`` or ``acc.add_(grad)`` for an fp32 ``acc`` (the same bits: one fp32 rounding per
    element), in one native pass where built: torch's mixed-dtype add ran at 2.4 G elements/s on the 16-core
    GPU host against 11.9 for its copy (benchmarks/optimizer_paths.py)."""
    if acc.dtype != torch.float32 or acc.numel() != grad.numel() or not acc.is_contiguous() or not grad.is_contiguous():
        raise ValueError("accumulate_: acc must be a contiguous fp32 tensor with grad's number of elements")
    if _native is not None and hasattr(_native, "accumulate") and grad.dtype in (torch.float32, torch.bfloat16):
        threads = torch.get_num_threads() if num_threads is None else int(num_threads)
        _native.accumulate(acc.data_ptr(), grad.data_ptr(), _GRAD_DTYPES[grad.dtype], acc.numel(), bool(copy), threads)
    elif copy:
        acc.copy_(grad.view(-1))
    else:
        acc.add_(grad.view(-1))
