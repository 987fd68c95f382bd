"""Throughput benchmark: Ratel against GPU-resident PyTorch on the reference GPT, in the same run.

For one shape (layers, hidden, heads, batch, sequence) it measures, after one warm-up step, the mean step
time of Ratel under a GPU budget (by default the smallest the planner accepts) and of plain PyTorch with
everything on the device (the model in its dtype, fp32 master weights and fused AdamW), when that fits.
It reports step time, tokens/s and model TFLOPS by the convention of docs/architecture.md:

    model FLOPs per step = 6 * N * tokens + 12 * L * h * s^2 * sequences     (recompute not counted)

with N every parameter counted once (tied embeddings once). With ``engine.profile`` available, one more
step is recorded and its summary (measured beside predicted) and plots are written to ``out``.
On a machine without CUDA it runs on the CPU, where the "GPU" tier is host memory: useful at tiny shapes to
check the path end to end, not as a performance figure.
"""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import ratel
from ratel.ir import format_bytes
from ratel.ir.hardware import host_memory
from ratel.models import GPT, GPTConfig
from ratel.runtime.calibrate import detect, synchronize
from ratel.tools.explain import explain
from ratel.tools.plots import save_plots
from ratel.tools.summary import plan_summary


def model_flops(n_params: int, layers: int, hidden: int, batch: int, seq: int) -> float:
    """FLOPs of one training step (forward + backward), the convention of docs/architecture.md."""
    return 6.0 * n_params * batch * seq + 12.0 * layers * hidden * seq * seq * batch


@dataclass
class BenchResult:
    rows: list[tuple[str, str]]
    ratel_step: float
    baseline_step: float | None
    plan: object
    measured: object | None


@dataclass(frozen=True)
class Timing:
    """Seconds per step over the timed steps: the median, and the fastest and slowest (the spread)."""

    median: float
    low: float
    high: float
    steps: int


WARMUP_STEPS = 2


def _time(step, steps: int, device: torch.device, warmup: int = WARMUP_STEPS) -> Timing:
    for _ in range(warmup):                  # allocator, kernels, the first plan, caches
        step()
    synchronize(device)
    seconds = []
    for _ in range(max(1, steps)):
        start = time.perf_counter()
        step()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return Timing(statistics.median(seconds), min(seconds), max(seconds), len(seconds))


def largest_difference(ours, reference) -> float:
    """The largest difference of any of the tensors ``ours`` from its twin in ``reference``, relative to that
    reference's largest magnitude (in fp32): how far a variant's loss and gradients are from the reference's."""
    return max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30)).item()
               for a, b in zip(ours, reference))


def publish(text: str, results: str | Path | None) -> None:
    """Print a benchmark's table and append it to ``results`` (benchmarks/RESULTS.md, or the file a script
    was given; None: print only), one blank line before it."""
    print(text, flush=True)
    if results is not None:
        with Path(results).open("a") as f:
            f.write("\n" + text.strip("\n") + "\n")


def mixed_precision_step(model: torch.nn.Module, lr: float, weight_decay: float = 0.01):
    """Plain PyTorch training as the baselines run it, all on the model's device: the model in its dtype,
    fp32 master weights (an fp32 model's parameters are their own) and torch's fused AdamW on them, the model's
    copy refreshed from the masters after each update. Returns ``step(ids, labels) -> loss``."""
    params = list(model.parameters())
    masters = [p.detach().float().requires_grad_() for p in params] if params[0].dtype != torch.float32 else params
    fused = params[0].device.type == "cuda" or hasattr(torch, "_fused_adamw_")
    opt = torch.optim.AdamW(masters, lr=lr, weight_decay=weight_decay, fused=fused)

    def step(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = model(ids, labels=labels).loss
        loss.backward()
        if masters is not params:
            for m, p in zip(masters, params):
                m.grad = p.grad.float()
                p.grad = None
        opt.step()
        opt.zero_grad(set_to_none=True)
        if masters is not params:
            with torch.no_grad():
                for m, p in zip(masters, params):
                    p.copy_(m)
        return loss

    return step


def _baseline(cfg, dtype, ids, steps: int, device: torch.device) -> tuple[float | None, str, int]:
    """Step timing of device-resident PyTorch (None when it does not fit), a note, and its peak bytes."""

    n_params = cfg.num_parameters()
    if device.type == "cpu":
        # weights + grads in dtype, fp32 master + Adam states: refuse before the OOM killer does.
        need = n_params * (2 * dtype.itemsize + 12 + (4 if dtype != torch.float32 else 0))
        if need > 0.6 * host_memory():
            return None, f"needs ~{format_bytes(need)} of host memory", 0
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = GPT(cfg).to(dtype).train()
        train_step = mixed_precision_step(model, lr=1e-5)

        def step():
            train_step(ids, ids)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = _time(step, steps, device)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        return seconds, "", peak
    except torch.OutOfMemoryError:
        return None, "does not fit in GPU memory", 0
    finally:
        model = train_step = None   # noqa: F841 - drop references before emptying the cache
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run_bench(layers: int, hidden: int, heads: int, batch: int, seq: int, *, vocab: int = 50304,
              budget=None, steps: int = 5, device: str = "auto", dtype: torch.dtype | None = None,
              baseline: bool = True, out: str | Path | None = None, log=print) -> BenchResult:
    """Run the benchmark and print its table with ``log``; returns the figures."""

    device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          "cpu" if device == "auto" else device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cfg = GPTConfig(vocab_size=vocab, n_layer=layers, n_head=heads, d_model=hidden, max_seq_len=seq)
    n_params = cfg.num_parameters()
    tokens = batch * seq
    flops = model_flops(n_params, layers, hidden, batch, seq)
    hardware = detect(device)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)

    with torch.device("meta"):
        meta_model = GPT(cfg).to(dtype).train()
    if budget is None:
        # The smallest budget the planner accepts for this shape: every unit recomputed from its inputs, every
        # group streamed.
        budget = explain(meta_model, "1TiB", (ids,), hardware=hardware, device=device,
                         activations="recompute", resident=False).memory.gpu_peak
    log(f"Ratel bench on {hardware.name} ({device}): GPT {layers}L h={hidden} {heads} heads "
        f"({n_params / 1e6:,.1f} M params, {str(dtype).replace('torch.', '')}), batch {batch} x seq {seq}")

    if device.type == "cuda":
        torch.cuda.empty_cache()
        base_alloc = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    engine = ratel.compile(meta_model, budget=budget, optimizer=ratel.AdamW(lr=1e-5), example_inputs=(ids,),
                           device=device, hardware=hardware, progress=False)
    measured = None
    try:
        def ratel_step():
            engine.backward(engine(ids, labels=ids).loss)
            engine.step()

        ratel_seconds = _time(ratel_step, steps, device)
        ratel_peak = torch.cuda.max_memory_allocated(device) - base_alloc if device.type == "cuda" else 0
        plan = engine.plan
        if hasattr(engine, "profile"):
            # One recorded step for the measured-beside-predicted summary and plots (not timed above).
            engine.profile = True
            ratel_step()
            engine.profile = False
            measured = getattr(engine, "last_step", None)
    finally:
        engine.close()
        del engine
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    baseline_seconds, why, baseline_peak = (None, "skipped (--no-baseline)", 0)
    if baseline:
        baseline_seconds, why, baseline_peak = _baseline(cfg, dtype, ids, steps, device)

    tier = "GPU" if device.type == "cuda" else "device"     # on a CPU run, host memory stands in for the GPU
    resident = f"{'GPU' if device.type == 'cuda' else device.type.upper()}-resident PyTorch"

    def speed(timing: Timing) -> str:
        seconds = timing.median
        return (f"{seconds * 1e3:,.1f} ms (median; {timing.low * 1e3:,.1f}-{timing.high * 1e3:,.1f} ms over "
                f"{timing.steps} steps), {tokens / seconds:,.0f} tokens/s, {flops / seconds / 1e12:,.2f} model TFLOPS")

    dtype_name = str(dtype).replace("torch.", "")
    rows = [
        ("parameters", f"{n_params:,} ({format_bytes(n_params * dtype.itemsize)} in {dtype_name})"),
        (f"{tier} budget", format_bytes(int(ratel.parse_bytes(budget)))),
        (f"planned {tier} peak", format_bytes(plan.memory.gpu_peak)),
    ]
    if device.type == "cuda":
        rows.append(("measured GPU peak", format_bytes(ratel_peak)))
    rows += [
        ("Ratel step", speed(ratel_seconds)),
        ("Ratel predicted step", f"{plan.times.total * 1e3:,.1f} ms"),
        (f"{resident} step", speed(baseline_seconds) if baseline_seconds else why),
    ]
    if baseline_seconds:
        if baseline_peak:
            rows.append((f"{resident} peak", format_bytes(baseline_peak)))
        rows.append(("Ratel / PyTorch step time", f"{ratel_seconds.median / baseline_seconds.median:.2f}x (medians; "
                     f"fastest to fastest {ratel_seconds.low / baseline_seconds.low:.2f}x)"))
    rows.append(("steps timed", f"{steps} each, after {WARMUP_STEPS} warm-up steps"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        log(f"  {key:<{width}}  {value}")

    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.txt").write_text(plan_summary(plan, measured))
        paths = save_plots(plan, out, measured)
        log(f"wrote {out / 'summary.txt'}, " + ", ".join(str(p) for p in paths)
            + ("" if measured is not None else " (predicted only: this engine records no measured step)"))
    return BenchResult(rows=rows, ratel_step=ratel_seconds.median,
                       baseline_step=baseline_seconds.median if baseline_seconds else None, plan=plan,
                       measured=measured)


__all__ = ["BenchResult", "Timing", "model_flops", "run_bench"]
