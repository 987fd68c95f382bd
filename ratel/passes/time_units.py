"""time_units: the seconds each distinct unit takes on the device a plan is for, measured there, once.

Not a pass: estimate_costs calls it for every distinct unit (units of one graph and input shapes are
measured once, under the key it already dedupes memory profiles with) and stores the result in
``UnitCost.fwd_seconds`` / ``grad_fwd_seconds`` / ``bwd_seconds``; the simulator prices a unit with them
instead of FLOPs at ``gpu_tflops * matmul_efficiency`` when they are there. Why: on the H200 a 3.6B GPT
step at batch 8 was predicted at 1.75 s and measured at 1.18 s (issue #11): one efficiency for every
shape is wrong by half, and every choice the planner makes (recompute or swap, prefetch depth) weighs
compute against copies.

Stages, per distinct unit:
  1. Decide (``timing_mode``): only for a device this machine has (a CUDA plan made on a CPU-only machine
     is priced from FLOPs), when ``PassContext.measure_units`` or ``RATEL_MEASURE_UNITS`` ask for it; by
     default only on CUDA (on the CPU target the planner's choices are kept independent of the machine's
     speed: goldens and plans compare across machines). ``ratel.explain`` and the CLI run nothing: they
     read the cache only.
  2. Look the unit up in the cache (``unit_times.json`` beside the hardware profile, ``ir.hardware.cache_dir``),
     keyed by host, device name, torch version and the unit's signature (its graph, shapes, dtypes and
     which parameters train), so re-planning a shape seen before runs nothing.
  3. Otherwise materialise the unit: random inputs, parameters and buffers of its placeholders' shapes,
     allocated for the measurement only, never more than the unit's own bytes (its placeholders plus the
     workspace estimate_costs measured on tensors without data); a unit whose bytes do not fit the GPU
     budget or the device's free memory is skipped (logged) and keeps the FLOP estimate.
  4. Time it: ``WARMUP`` untimed then ``REPEATS`` timed runs of a no-grad forward, a forward with autograd,
     and the backward alone from what that forward saved (parameter gradients accumulated into buffers as
     the runtime's are); the fastest of each. CUDA events on CUDA, ``perf_counter`` on the CPU. The caller's
     random streams are left as they were (a meta-device model is initialised after planning from them).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.fx as fx

from ratel.ir import META_TENSOR, UnitCall
from ratel.ir.hardware import cache_dir, cpu_model, host_memory

log = logging.getLogger("ratel.passes")

MEASURE_ENV = "RATEL_MEASURE_UNITS"   # "1": measure (also on the CPU target); "0": never
CACHE_NAME = "unit_times.json"
WARMUP = 2          # untimed runs: first-call allocations, kernel selection, caches
# Timed runs; the fastest of each phase is kept: the figure is cached for good, so it must not carry the
# load another process put on the machine for a moment (on a shared CPU a median was seen 6x too long).
REPEATS = 5


@dataclass(frozen=True)
class UnitTimes:
    """Measured seconds of one unit: a no-grad forward, a forward with autograd, and the backward alone
    (from what the autograd forward saved)."""

    fwd: float
    grad_fwd: float
    bwd: float


# ------------------------------------------------------------------------------------------------ decision
def device_present(device: str) -> bool:
    """Whether this machine has ``device``: units can only be timed where they will run."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return True
    if dev.type == "cuda":
        return torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()
    return False


def timing_mode(requested: bool | str | None, device: str) -> str:
    """How estimate_costs gets unit times: "measure" (cached, or run now), "cached" (only what the cache
    holds; nothing runs) or "off" (every unit priced from FLOPs).

    ``requested`` (``PassContext.measure_units``): True or False decide; None takes ``RATEL_MEASURE_UNITS``
    when set, else measures on CUDA only; "cached" is what None would decide with "measure" read as
    "cached" (``ratel.explain``: it runs nothing, yet plans what ``compile`` would once the shapes were
    timed). Never for a device this machine lacks."""
    cached_only = requested == "cached"
    if requested is None or cached_only:
        env = os.environ.get(MEASURE_ENV, "").strip().lower()
        requested = env not in ("0", "false", "off", "no") if env else torch.device(device).type == "cuda"
    if not requested:
        return "off"
    if not device_present(device):
        log.info("ratel: units not timed: this machine has no %s (compute priced from FLOPs)", device)
        return "off"
    return "cached" if cached_only else "measure"


# ------------------------------------------------------------------------------------------------ cache
def cache_path() -> Path:
    return cache_dir() / CACHE_NAME


def device_name(device: str) -> str:
    """The machine and device a measurement holds for. On the CPU the thread count is part of it: the same
    unit runs at a different speed on 2 or 32 threads."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{cpu_model()} x{torch.get_num_threads()} threads"


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def signature(structure: tuple, trainable: tuple[bool, ...]) -> str:
    """A digest of a unit's structure key (ops, connections, placeholder shapes and dtypes: estimate_costs'
    ``structure_key``) and which parameters train. Function reprs lose their address (``<function f at
    0x...>``): the digest must be equal in every process."""
    text = _ADDRESS.sub("", repr((structure, trainable)))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def cache_key(device: str, digest: str) -> str:
    return f"{platform.node()}|{device_name(device)}|torch {torch.__version__}|{digest}"


class TimeCache:
    """The measurements of this machine, read once per plan and written back (merged with what other
    processes wrote meanwhile) only when something new was measured."""

    def __init__(self, path: Path | None = None):
        self.path = path or cache_path()
        self.entries: dict[str, dict] = _read(self.path)
        self.new: dict[str, dict] = {}

    def get(self, key: str) -> UnitTimes | None:
        entry = self.entries.get(key)
        try:
            return UnitTimes(**entry) if entry is not None else None
        except TypeError:     # written by another version: measure again
            return None

    def put(self, key: str, times: UnitTimes) -> None:
        self.entries[key] = self.new[key] = asdict(times)

    def save(self) -> None:
        if not self.new:
            return
        data = {**_read(self.path), **self.new}
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, self.path)     # atomic: a concurrent reader sees the old file or the new one
        except OSError as exc:   # a read-only home must not stop planning
            log.warning("ratel: could not cache unit times at %s: %s", self.path, exc)
        self.new = {}


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# ------------------------------------------------------------------------------------------------ measuring
def placeholder_bytes(sub: fx.GraphModule) -> int:
    """Bytes the unit's placeholders take when materialised: inputs, parameters, buffers."""
    return sum(m.value_bytes for n in sub.graph.nodes if n.op == "placeholder"
               for m in [n.meta.get(META_TENSOR)] if m is not None)


def room(device: str, gpu_budget: int) -> int:
    """Bytes a measurement may take on ``device``: the GPU budget, and no more than is free now (on CUDA
    what the device has free plus what torch's allocator holds unused; on the CPU available memory)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        free += torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    else:
        free = host_memory()
    return min(gpu_budget, free)


def _materialise(sub: fx.GraphModule, call: UnitCall, device: torch.device, trainable: frozenset[str],
                 gen: torch.Generator) -> tuple[list, list[bool]] | None:
    """Random tensors for the unit's placeholders, and whether each takes a gradient (activations that are
    floating point, trainable parameters); None when a tensor placeholder has no shape metadata.
    Integer inputs (token ids, labels, positions) are zeros: a valid index for every embedding and loss;
    boolean ones (masks) are True."""
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    wants = ([True] * len(call.inputs) + [name in trainable for name in call.params] + [False] * len(call.buffers))
    args, grads = [], []
    for node, wanted in zip(placeholders, wants):
        meta = node.meta.get(META_TENSOR)
        if meta is None:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                return None
            args.append(val)
            grads.append(False)
            continue
        if meta.dtype.is_floating_point:
            # Small values, as initialised weights are: no overflow in low precision, no denormal slow paths.
            t = torch.randn(meta.shape, generator=gen, device=device, dtype=torch.float32).mul_(0.02).to(meta.dtype)
        elif meta.dtype == torch.bool:
            t = torch.ones(meta.shape, dtype=torch.bool, device=device)
        else:
            t = torch.zeros(meta.shape, dtype=meta.dtype, device=device)
        args.append(t)
        grads.append(wanted and meta.dtype.is_floating_point)
    return args, grads


def release(device: str) -> None:
    """Give the blocks measuring left in torch's CUDA allocator back to the device: they were cut for the
    units' shapes, not the engine's buffers, and would count against the budget as reserved memory."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


class _Clock:
    """Seconds of the work issued between ``start`` and ``stop``: CUDA events on the current stream (no
    synchronisation until ``read``), ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def start(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, begin) -> None:
        self.marks.append((begin, self.start()))

    def read(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in self.marks]
        return [b - a for a, b in self.marks]


def time_unit(sub: fx.GraphModule, call: UnitCall, device: str, trainable: frozenset[str]) -> UnitTimes | None:
    """Run one unit on ``device`` with random data and time its three phases; None if it cannot be
    materialised (a tensor placeholder without metadata)."""
    dev = torch.device(device)
    devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    # Dropout inside the unit draws from the global streams: the caller's seed must give the same model and
    # the same batches whether or not this shape was measured before.
    on_device = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
    with torch.random.fork_rng(devices=devices), on_device:
        gen = torch.Generator(device=dev).manual_seed(0)
        made = _materialise(sub, call, dev, trainable, gen)
        if made is None:
            return None
        args, wants = made
        fwd, grad_fwd, bwd = _Clock(dev), _Clock(dev), _Clock(dev)
        leaves = [a.detach().requires_grad_(True) if w else a for a, w in zip(args, wants)]
        params_from = len(call.inputs)
        # Parameter gradients accumulate in place into buffers, as the runtime's grad views take them.
        buffers = {i: torch.zeros_like(a) for i, a in enumerate(leaves) if wants[i] and i >= params_from}
        for rep in range(WARMUP + REPEATS):
            timed = rep >= WARMUP
            with torch.no_grad():
                begin = fwd.start()
                outs = sub(*args)
                if timed:
                    fwd.stop(begin)
            del outs
            for i, b in buffers.items():
                leaves[i].grad = b
            for i, a in enumerate(leaves):
                if wants[i] and i < params_from:
                    a.grad = None
            with torch.enable_grad():
                begin = grad_fwd.start()
                outs = sub(*leaves)
                if timed:
                    grad_fwd.stop(begin)
            diff = [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]
            wrt = [a for a, w in zip(leaves, wants) if w]
            seeds = [torch.ones_like(o) for o in diff]
            begin = bwd.start()
            if diff and wrt:
                torch.autograd.backward(diff, seeds, inputs=wrt)
            if timed:
                bwd.stop(begin)
            del outs, diff, seeds
        times = UnitTimes(fwd=min(fwd.read()), grad_fwd=min(grad_fwd.read()), bwd=min(bwd.read()))
        del args, leaves, buffers
    return times

