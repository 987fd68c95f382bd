"""The public face: ``ratel.compile``, ``Engine`` and ``Budget``.

``compile`` captures the model, runs the pass pipeline for the example inputs (so a budget too small is
refused before any memory is taken), materialises the parameters into host memory and returns an Engine.
The Engine traces and plans again, once, for every new input shape (batch and sequence sizes may change
between steps) and keeps the most recent programs; parameters, optimizer states and the GPU ring are shared
by all of them.
"""
from __future__ import annotations

import hashlib
import inspect
import logging
import re
import shutil
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils._pytree as pytree
from torch import nn

from ratel.errors import BudgetError, RatelError
from ratel.hardware import HardwareProfile
from ratel.ir import Plan, Tier, format_bytes
from ratel.passes import PassContext, default_pass_manager
from ratel.runtime.activations import ActivationStore
from ratel.runtime.engine import Runtime
from ratel.runtime.memory import ALIGN, Lanes, PinnedPool
from ratel.optim import EngineOptimizer, build_param_groups, norm_order, segments_of
from ratel.runtime.optimizer import AdamW, CPUOptimizer, Hyper
from ratel.runtime.recorder import Recorder
from ratel.runtime.saved import SavedActivations, SsdSaved, saved_pool_bytes
from ratel.runtime.ssd import SsdParams, SsdStates, model_key
from ratel.runtime.swapper import Swapper
from ratel.runtime.param_store import ParamStore, host_pool_bytes, materialise_module
from ratel.trace import TracedModel, canonical_parameter_names, capturing, trace_model

log = logging.getLogger("ratel")

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000 ** 2, "mb": 1000 ** 2, "g": 1000 ** 3, "gb": 1000 ** 3,
          "t": 1000 ** 4, "tb": 1000 ** 4, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(value: int | float | str | None, what: str = "budget") -> int | None:
    """Bytes from an int or a string such as "24GiB", "512 MiB", "1.5e9", "80GB"."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"{what}={value!r}: must be a positive number of bytes, e.g. 24GiB")
        return int(value)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        if match and match.group(2).lower() in _UNITS:
            result = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
            if result > 0:
                return result
    raise ValueError(f"{what}={value!r}: give bytes as an int or a string such as '24GiB', '512MiB' or '80GB'")


@dataclass(frozen=True)
class Budget:
    """Memory Ratel may use on each tier. ``gpu`` is required; the others default to what the machine has."""

    gpu: int | str
    host: int | str | None = None
    ssd: int | str | None = None
    ssd_dir: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "gpu", parse_bytes(self.gpu, "Budget.gpu"))
        object.__setattr__(self, "host", parse_bytes(self.host, "Budget.host"))
        object.__setattr__(self, "ssd", parse_bytes(self.ssd, "Budget.ssd"))

    def resolved(self, hardware: HardwareProfile) -> "Budget":
        host = self.host if self.host is not None else int(hardware.host_bytes * 0.9)
        return Budget(gpu=self.gpu, host=host, ssd=self.ssd, ssd_dir=self.ssd_dir)


def ssd_dirs(ssd_dir) -> list[str]:
    """``Budget.ssd_dir`` as a list of directories: one path, a list, or a comma-separated string (one per SSD;
    swap files are striped across them)."""
    if isinstance(ssd_dir, (list, tuple)):
        return [str(d) for d in ssd_dir]
    return [d for d in str(ssd_dir).split(",") if d]


def _as_budget(budget) -> Budget:
    if isinstance(budget, Budget):
        return budget
    return Budget(gpu=budget)


def _default_kwargs(model: nn.Module, example_inputs: tuple, example_kwargs: dict | None) -> dict:
    """Keywords of an example training call: ``labels`` defaults to the first input for models taking labels."""
    params = inspect.signature(model.forward).parameters
    kwargs = dict(example_kwargs or {})
    if example_kwargs is None and "labels" in params and example_inputs:
        kwargs["labels"] = example_inputs[0]
    return kwargs


def call_kwargs(model: nn.Module, kwargs: dict) -> dict:
    """The keywords a call is traced and run with: transformers models without a KV cache, keys sorted so
    the same call with keywords in another order is the same program."""
    params = inspect.signature(model.forward).parameters
    # A wrapper forwarding **kwargs to a transformers model (peft's PeftModel) takes use_cache too.
    forwards_kwargs = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()) and hasattr(
        getattr(model, "config", None), "use_cache")
    extra = {"use_cache": False} if "use_cache" in params or forwards_kwargs else {}
    return dict(sorted({**extra, **kwargs}.items()))


class Engine:
    """Trains a compiled model: ``engine(**batch).loss``, ``engine.backward(loss)``, ``engine.step()``."""

    def __init__(self, model: nn.Module, budget: Budget, optimizer, device: torch.device,
                 hardware: HardwareProfile, weights=None, depth: int = 2, max_programs: int = 4,
                 progress: bool = True, keep_swap_files: bool = False, activations: str = "auto",
                 accumulate: int = 1, max_grad_norm: float | None = None):
        if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
            raise ValueError(f"accumulate={accumulate!r}: give the number of micro-batches per update, an int >= 1")
        if max_grad_norm is not None and not (float(max_grad_norm) > 0):
            raise ValueError(f"max_grad_norm={max_grad_norm!r}: give a positive norm (e.g. 1.0), or None for no "
                             "clipping")
        self.model = model
        self.device = device
        self.hardware = hardware
        self.budget = budget.resolved(hardware)
        self.accumulate = accumulate
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        groups, defaults, self._group_of = build_param_groups(model, optimizer)
        #: a torch.optim.Optimizer: its param_groups carry lr, betas, eps, weight_decay for the next update,
        #: so torch LR schedulers drive it; ``engine.optimizer.step()`` is ``engine.step()``
        self.optimizer = EngineOptimizer(groups, defaults, self._step)
        self.depth = depth
        self.max_programs = max_programs
        self.progress = progress
        self._weights = weights
        self._training = model.training
        self._programs: OrderedDict[tuple, tuple[torch.fx.GraphModule, Plan, Runtime, PinnedPool | None]] = OrderedDict()
        self._store: ParamStore | None = None
        self._store_pool: PinnedPool | None = None
        self._optimizer: CPUOptimizer | None = None
        self._swapper: Swapper | None = None
        self._ssd: SsdStates | None = None
        self.keep_swap_files = keep_swap_files
        self._activations = activations
        self._buffers: dict[str, torch.Tensor] | None = None
        self._lanes = Lanes(device)
        self._latest: tuple | None = None
        self._closed = False
        self.profile = False               # record every step: engine.last_step, plan.summary(measured=...)
        self.last_step = None
        self._recorder = None
        self._bound: list[tuple[nn.Parameter, torch.Tensor]] = []   # model parameters aliasing Ratel's copies

    # ------------------------------------------------------------------ programs
    def _key(self, flat: list, spec) -> tuple:
        shapes = tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else ("value", x) for x in flat)
        return (self._training, str(spec), shapes)

    def _program(self, args: tuple, kwargs: dict):
        kwargs = call_kwargs(self.model, kwargs)
        flat, spec = pytree.tree_flatten((args, kwargs))
        key = self._key(flat, spec)
        if key in self._programs:
            self._programs.move_to_end(key)
            return self._programs[key], flat
        program = self._build(args, kwargs)
        self._programs[key] = program
        while len(self._programs) > self.max_programs:
            _, (_, _, old_runtime, old_pool) = self._programs.popitem(last=False)
            for release in _program_releases(old_runtime, old_pool):
                release()
        return program, flat

    def _build(self, args: tuple, kwargs: dict):
        self._check_open("run a forward")
        was_training = self.model.training
        self.model.train(self._training)
        try:
            traced = trace_model(self.model, args, kwargs)
        finally:
            self.model.train(was_training)
        gm, plan = plan_program(traced, self.budget, self.hardware, self.device, self.depth, self._activations,
                                accumulate=self.accumulate, clip=self.max_grad_norm is not None)
        if plan.memory.ssd_total and self._store is None:
            check_ssd_space(plan.memory.ssd_total, ssd_dirs(self.budget.ssd_dir), model_key(self.model))
        if self._store is None:
            self._create_store(plan, traced)
        elif tuple(g.params for g in plan.groups) != tuple(g.params for g in self._store.groups):
            raise RatelError("a new input shape changed how parameters are grouped; this is a Ratel bug")
        act_bytes = activation_pool_bytes(plan) + saved_pool_bytes(plan)
        pool = PinnedPool(act_bytes, pin=self.device.type == "cuda") if act_bytes else None
        activations = ActivationStore(self._lanes, pool, self.device)
        ssd_saved = None
        if any(d.tier == Tier.SSD for u in plan.activations.units for d in u.decisions):
            layout = tuple((u.unit, d.key, d.nbytes) for u in plan.activations.units for d in u.decisions
                           if d.tier == Tier.SSD)
            name = f"{model_key(self.model)}/activations-{hashlib.sha1(repr(layout).encode()).hexdigest()[:10]}"
            ssd_saved = SsdSaved(self._ensure_swapper(), plan.activations, pool, name)
        saved = SavedActivations(self._lanes, pool, self.device, ssd_saved)
        runtime = Runtime(gm, plan, self._store, self._buffers, self._lanes, activations, self._optimizer, saved)
        log.info("ratel: planned %s (peak GPU %s of %s, host %s)", [tuple(a.shape) for a in args
                 if isinstance(a, torch.Tensor)], format_bytes(plan.memory.gpu_peak),
                 format_bytes(plan.budget_gpu), format_bytes(plan.memory.host_total))
        return gm, plan, runtime, pool

    def _ensure_swapper(self) -> Swapper:
        if self._swapper is None:
            self._swapper = Swapper(dirs=ssd_dirs(self.budget.ssd_dir))
        return self._swapper

    def _create_store(self, plan: Plan, traced: TracedModel) -> None:
        ssd_groups = [g for g in plan.groups if g.trainable and plan.placement.optimizer_tier_of(g.name) == Tier.SSD]
        if ssd_groups:
            self._ssd = SsdStates(self._ensure_swapper(), ssd_groups, model_key(self.model),
                                  forward_order=self.max_grad_norm is not None)
        params_on_ssd = [g for g in plan.groups if plan.placement.param_tier_of(g.name) == Tier.SSD]
        self._store_pool = PinnedPool(host_pool_bytes(plan.groups, {g.name for g in params_on_ssd}),
                                      pin=self.device.type == "cuda")
        ssd_params = (SsdParams(self._ensure_swapper(), params_on_ssd, model_key(self.model), self._store_pool)
                      if params_on_ssd else None)
        self._store = ParamStore(plan, self.device, self._store_pool, ssd=self._ssd, ssd_params=ssd_params)
        self._store.load(self.model, self._weights, progress=self.progress)
        self._optimizer = CPUOptimizer(
            self._store, Hyper.of(self.optimizer.defaults), ssd=self._ssd, segments=segments_of(plan.groups, self._group_of), accumulate=self.accumulate,
            max_grad_norm=self.max_grad_norm, norm_order=norm_order(self.model, plan.groups))
        self._buffers = load_buffers(self.model, traced, self.device)
        self._bind_model()

    # ------------------------------------------------------------------ training
    def __call__(self, *args, **kwargs):
        self._check_open("run a forward")
        args = tuple(self._to_device(a) for a in args)
        kwargs = {k: self._to_device(v) for k, v in kwargs.items()}
        (gm, plan, runtime, _), flat = self._program(args, kwargs)
        if self._latest is not None and self._latest[2] is not runtime:
            self._latest[2].finish_step()
        self._latest = (gm, plan, runtime)
        self._recorder = Recorder(self.device, len(plan.steps)) if self.profile and torch.is_grad_enabled() else None
        runtime.begin(self._recorder)
        out_flat = gm(runtime, *flat)
        if not torch.is_grad_enabled():
            runtime.finish_step()
        return pytree.tree_unflatten(list(out_flat), self._out_spec(gm))

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss``: exactly the gradients ``loss.backward()`` computes. Without accumulation
        (or at the ``accumulate``-th micro-batch) each group's AdamW update starts on the CPU as soon as its
        gradient lands; before that, gradients are summed in host memory."""
        self._check_open("call backward()")
        if self._latest is None:
            raise RatelError("backward() before any forward: call the engine on a batch first")
        if not isinstance(loss, torch.Tensor) or loss.grad_fn is None:
            raise RatelError("backward() needs the loss returned by this engine's forward, computed with grad enabled "
                             "(call the engine with labels= so the model returns a loss)")
        runtime = self._latest[2]
        if not runtime.pending_backward:
            raise RatelError("backward() was already called for the latest forward: Ratel frees a step's activations "
                             "as its backward passes them, so each forward takes one backward. Run a new forward "
                             "for the next micro-batch")
        self._optimizer.begin_backward(self.optimizer.hypers())
        try:
            loss.backward()
        finally:
            self._optimizer.end_backward()
            runtime.finish_step()

    def step(self) -> None:
        """Finish the update: every parameter update of this accumulation cycle is applied when it returns
        (after fewer than ``accumulate`` micro-batches too, with the gradients summed so far), and the
        model passed to ``compile`` holds the new weights. The same as ``engine.optimizer.step()``."""
        self.optimizer.step()    # through the torch optimizer, so LR schedulers see the step

    def _step(self) -> None:
        self._check_open("call step()")
        if self._optimizer is not None:
            self._optimizer.finish_cycle()
        if self._recorder is not None:
            self.last_step = self._recorder.finish()
            self._recorder = None

    @property
    def grad_norm(self) -> float | None:
        """With ``max_grad_norm``: the total gradient norm of the last update, before clipping (the value
        ``torch.nn.utils.clip_grad_norm_`` returns); ``inf`` or ``nan`` when that step was skipped."""
        if self._optimizer is None or self.max_grad_norm is None:
            return None
        self._optimizer.wait_all()
        return self._optimizer.grad_norm

    @property
    def activations(self) -> str:
        """The activation policy ("auto", "recompute", "keep", "host", "ssd"). Setting it replans every shape
        on its next call; parameters and optimizer states stay where they are."""
        return self._activations

    @activations.setter
    def activations(self, policy: str) -> None:
        from ratel.passes.plan_activations import POLICIES
        if policy not in POLICIES:
            raise ValueError(f"activations={policy!r}: choose one of {POLICIES}")
        self._check_open("change the activation policy")
        if self._optimizer is not None:
            self._optimizer.wait_all()
        for _, _, runtime, pool in self._programs.values():
            for release in _program_releases(runtime, pool):
                release()
        self._programs.clear()
        self._latest = None
        self._activations = policy

    @property
    def lr(self) -> float:
        """The learning rate of the first param group (``engine.optimizer.param_groups`` has them all)."""
        return self.optimizer.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        self._check_open("set the learning rate")
        for group in self.optimizer.param_groups:   # read by the next update, as a torch optimizer's
            group["lr"] = float(value)

    def train(self, mode: bool = True) -> "Engine":
        self._training = mode
        return self

    def eval(self) -> "Engine":
        return self.train(False)

    # ------------------------------------------------------------------ the user's model object
    def _bind_model(self) -> None:
        """Point the model's parameters at the host copies Ratel updates (no memory of their own), so after
        ``step()`` the model holds the trained weights; where a parameter has no host copy (a meta-device
        model, compute copies on SSD), using the model raises an error that says what to use instead."""
        canonical = canonical_parameter_names(self.model)
        unbound = []
        for name, p in self.model.named_parameters():
            view = self._store.host_view(canonical[name])
            if p.is_meta or view is None or view.dtype != p.dtype:
                unbound.append(name)
                continue
            with torch.no_grad():
                p.data = view
            self._bound.append((p, view))
        if unbound:
            why = ("it was created on the meta device" if any(p.is_meta for p in self.model.parameters())
                   else f"the compute copies of {len(unbound)} parameters (first: {unbound[0]}) live on SSD")
            self._guard_model(why)

    def _guard_model(self, why: str) -> None:
        def refuse(*_args, **_kwargs):
            if capturing():      # Ratel itself tracing the model (a new shape, another engine)
                return None
            raise RatelError(f"the model passed to ratel.compile does not hold the trained weights ({why}): run it "
                             "with the engine (engine(...)) and read its weights with engine.state_dict(), e.g. "
                             "fresh_model.load_state_dict(engine.state_dict())")

        self.model.register_forward_pre_hook(refuse)
        self.model.register_state_dict_pre_hook(refuse)

    def _unbind_model(self) -> None:
        """On close: the model keeps the trained weights in memory of its own (Ratel's pools are freed)."""
        bound, self._bound = self._bound, []
        with torch.no_grad():
            for p, view in bound:
                if p.data.data_ptr() == view.data_ptr():
                    p.data = view.clone()

    def _check_open(self, action: str) -> None:
        if self._closed:
            raise RatelError(f"cannot {action}: the engine is closed. Read the weights before close() with "
                             "engine.state_dict(), or compile the model again")

    # ------------------------------------------------------------------ inspection
    @property
    def plan(self) -> Plan:
        if self._latest is None:
            raise RatelError("no plan yet: compile with example_inputs or run a forward first")
        return self._latest[1]

    @property
    def graph(self) -> str:
        from ratel.tools.printer import format_graph
        if self._latest is None:
            raise RatelError("no graph yet: compile with example_inputs or run a forward first")
        return format_graph(self._latest[0])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The model's persistent state under its own names, as CPU tensors: the fp32 master of every
        parameter (frozen ones: their values) and the persistent buffers, so
        ``fresh_model.load_state_dict(engine.state_dict())`` loads strictly. Waits for updates in flight."""
        self._check_open("read the state_dict")
        if self._store is None:
            raise RatelError("no parameters yet: compile with example_inputs or run a forward first")
        if self._optimizer is not None:
            self._optimizer.wait_all()
        params = self._store.state_dict(self.model)
        out = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            out[name] = params[name] if name in params else p.detach().cpu().clone()
        for name, buf in persistent_buffers(self.model):
            if name in (self._buffers or {}):
                out[name] = self._buffers[name].detach().cpu().clone()
            elif buf.is_meta:
                out[name] = _rebuild_meta_buffer(self.model, name).detach().clone()
            else:
                out[name] = buf.detach().cpu().clone()
        return out

    def host_bytes_allocated(self) -> int:
        """Host memory Ratel holds right now (pinned pools, masters, Adam states, staging), to check against
        ``Budget.host``."""
        storages: dict[int, int] = {}

        def add(t):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                s = t.untyped_storage()
                storages[s.data_ptr()] = s.nbytes()

        if self._store_pool is not None:
            add(self._store_pool.buffer)
        if self._store is not None:
            for table in (self._store.master, self._store.exp_avg, self._store.exp_avg_sq):
                for t in table.values():
                    add(t)
        for _, _, _, pool in self._programs.values():
            if pool is not None:
                add(pool.buffer)
        if self._ssd is not None:
            for b in self._ssd.buffers:
                add(b.data)
        if self._optimizer is not None:
            for t in self._optimizer.acc.values():
                add(t)
        return sum(storages.values())

    def close(self) -> None:
        """Free pinned memory, device memory and swap files; the engine cannot be used afterwards.

        Every resource is released even if one step fails; the first error is raised at the end.
        """
        if self._closed:
            return
        self._closed = True
        errors: list[BaseException] = []

        def attempt(action) -> None:
            try:
                action()
            except BaseException as exc:  # noqa: BLE001 - collected, re-raised below
                errors.append(exc)

        if self._optimizer is not None:
            attempt(self._optimizer.wait_all)
            attempt(self._optimizer.close)
        attempt(self._unbind_model)
        for _, _, runtime, pool in self._programs.values():
            for release in _program_releases(runtime, pool):
                attempt(release)
        self._programs.clear()
        self._latest = None
        self._store = None
        if self._store_pool is not None:
            attempt(self._store_pool.close)
            self._store_pool = None
        if self._ssd is not None:
            attempt(self._ssd.close)
            self._ssd = None
        if self._swapper is not None:
            attempt(lambda: self._swapper.close(remove=not self.keep_swap_files))
            self._swapper = None
        if errors:
            raise errors[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # ------------------------------------------------------------------ helpers
    def _to_device(self, value):
        if isinstance(value, torch.Tensor) and value.device != self.device:
            return value.to(self.device, non_blocking=True)
        return value

    @staticmethod
    def _out_spec(gm):
        return gm.meta["ratel.out_spec"]


def check_ssd_space(needed: int, dirs: list[str], key: str) -> None:
    """Refuse, before any swap file is written, a plan whose SSD bytes do not fit the free space of its folders
    (swap files are striped evenly; files a previous run of this model left there are reused)."""
    share = -(-needed // max(1, len(dirs)))
    for d in dirs:
        if not Path(d).is_dir():
            raise RatelError(f"Budget.ssd_dir {d} is not a folder: create it (on the SSD) or give another path")
        reusable = sum(f.stat().st_size for f in (Path(d) / key).glob("*") if f.is_file()) \
            if (Path(d) / key).is_dir() else 0
        free = shutil.disk_usage(d).free + reusable
        if share > free:
            raise BudgetError(
                f"the plan puts {format_bytes(needed)} on SSD ({format_bytes(share)} in each of {len(dirs)} "
                f"folder(s)), but {d} has {format_bytes(free)} free. Free space there, add another SSD folder "
                "(Budget(ssd_dir='a,b')), or raise Budget(host=...) so less goes to SSD",
                tier="ssd", needed=needed, budget=free * len(dirs))


def persistent_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Buffers ``model.state_dict()`` holds (``persistent=False`` ones, like rotary ``inv_freq``, are not)."""
    out = []
    for prefix, module in model.named_modules():
        for name, buf in module._buffers.items():
            if buf is not None and name not in module._non_persistent_buffers_set:
                out.append((f"{prefix}.{name}" if prefix else name, buf))
    return out


def _program_releases(runtime: Runtime, pool: PinnedPool | None) -> list:
    """What freeing one program takes, in order: its step state, its SSD activation staging, its pinned pool."""
    releases = [runtime.finish_step]
    if runtime.saved.ssd is not None:
        releases.append(runtime.saved.ssd.close)
    if pool is not None:
        releases.append(pool.close)
    return releases


def activation_pool_bytes(plan: Plan) -> int:
    return sum((a.nbytes + ALIGN - 1) // ALIGN * ALIGN + ALIGN for a in plan.placement.activations
               if a.tier == Tier.HOST)


def load_buffers(model: nn.Module, traced: TracedModel, device: torch.device) -> dict[str, torch.Tensor]:
    """Buffers and lifted constants on the device; meta buffers are rebuilt by the model's initialiser."""
    out: dict[str, torch.Tensor] = {}
    wanted = {name for _, name in traced.buffers}
    constants = dict(traced.constants)
    for name in sorted(wanted):
        value = constants[name] if name in constants else model.get_buffer(name)
        if isinstance(value, torch.Tensor) and value.is_meta:
            value = _rebuild_meta_buffer(model, name)
        if isinstance(value, torch.Tensor):
            value = value.detach().to(device)
        out[name] = value
    return out


def _rebuild_meta_buffer(model: nn.Module, name: str) -> torch.Tensor:
    """A buffer of a meta-device model, computed by running the model's initialiser on its owner module."""
    module_path, _, leaf = name.rpartition(".")
    init = getattr(model, "init_module", None) or getattr(model, "_init_weights", None)
    try:
        owner = model.get_submodule(module_path) if module_path else model
    except AttributeError:
        owner = None
    if init is None or owner is None or leaf not in dict(owner.named_buffers(recurse=False)):
        raise RatelError(f"buffer {name} lives on the meta device and Ratel cannot rebuild it: create the model on "
                         "the CPU, or give it an _init_weights(module) method that initialises this buffer")
    return materialise_module(model, module_path).get_buffer(leaf)


def plan_program(traced: TracedModel, budget: Budget, hardware: HardwareProfile, device: torch.device,
                 depth: int = 2, activations: str = "auto", accumulate: int = 1, clip: bool = False):
    """Run the pass pipeline on a traced model; returns the rewritten GraphModule and its Plan."""
    dtypes = {p.dtype for p in traced.param_info}
    compute_dtype = max(dtypes, key=lambda d: sum(p.numel for p in traced.param_info if p.dtype == d)) \
        if dtypes else torch.float32
    ctx = PassContext(traced=traced, budget=budget, hardware=hardware, compute_dtype=compute_dtype,
                      device=str(device), depth=depth, activation_policy=activations, accumulate=accumulate,
                      clip=clip)
    gm = default_pass_manager().run(traced.gm, ctx)
    gm.meta["ratel.out_spec"] = traced.out_spec
    return gm, ctx.get(Plan)


def compile(model: nn.Module, budget: Budget | int | str, optimizer: AdamW | None = None,
            example_inputs: tuple | None = None, example_kwargs: dict | None = None, *,
            device: str | torch.device | None = None, hardware: HardwareProfile | None = None,
            weights: str | None = None, depth: int = 2, progress: bool = True,
            keep_swap_files: bool = False, activations: str = "auto", accumulate: int = 1,
            max_grad_norm: float | None = None) -> Engine:
    """Compile ``model`` for training under ``budget``.

    model           an nn.Module with repeated blocks (a ``ratel.models.GPT`` or a transformers causal LM),
                    possibly created on the meta device (its parameters are then initialised or read from
                    ``weights``, one module at a time, straight into host memory)
    budget          GPU bytes ("24GiB") or a ``Budget(gpu=, host=, ssd=, ssd_dir=)``
    optimizer       ``ratel.AdamW(lr=..., weight_decay=...)``, or ``torch.optim.AdamW(param_groups, ...)`` for
                    per-group options; the update runs on the CPU during backward. ``engine.optimizer`` is a
                    ``torch.optim.Optimizer`` for LR schedulers.
    accumulate      micro-batches per update: ``engine.backward(loss)`` k times (the user divides the loss by
                    k, as in PyTorch), then ``engine.step()``; gradients are summed in fp32 host memory
    max_grad_norm   clip the global gradient norm as ``torch.nn.utils.clip_grad_norm_`` does before AdamW;
                    ``engine.grad_norm`` is the norm before clipping; a non-finite norm skips the step
    example_inputs  positional inputs of a training call; with them the plan is made (and a budget too
                    small refused) now. ``labels`` defaults to the first input for models that take labels.
    weights         a local .safetensors file or a folder of them, read by parameter name
    keep_swap_files leave the SSD swap files in place on close (they are named after the model)
    activations     "auto" (plan every saved tensor: keep / host / SSD / recompute), or a fixed policy:
                    "recompute" (checkpoint unit inputs only), "keep", "host", "ssd"
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"ratel.compile expects an nn.Module, got {type(model).__name__}")
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    hardware = hardware or HardwareProfile.detect(device)
    engine = Engine(model, _as_budget(budget), optimizer, device, hardware, weights=weights,
                    depth=depth, progress=progress, keep_swap_files=keep_swap_files, activations=activations,
                    accumulate=accumulate, max_grad_norm=max_grad_norm)
    if example_inputs is not None:
        example_inputs = tuple(example_inputs)
        kwargs = _default_kwargs(model, example_inputs, example_kwargs)
        (gm, plan, runtime, _), _ = engine._program(tuple(engine._to_device(a) for a in example_inputs),
                                                    {k: engine._to_device(v) for k, v in kwargs.items()})
        engine._latest = (gm, plan, runtime)
    return engine


__all__ = ["AdamW", "Budget", "BudgetError", "Engine", "compile", "parse_bytes"]
