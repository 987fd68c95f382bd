"""Runtime assembly: from a Plan to the objects that execute it.

``Resources`` holds what every program (input shape) of one engine shares — the parameter store and its
pinned pool, the CPU optimizer, the SSD tiers and their swapper, the model's buffers on the device — made
from the first plan. ``Resources.program(gm, plan)`` builds one program's ``Runtime`` with its own pinned
pool for activations; ``Program.release()`` frees it. Nothing here plans: every size comes from the Plan
and ``ratel.ir.layout``.
"""
from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn

from ratel.errors import BudgetError, RatelError
from ratel.ir import Plan, Tier, format_bytes
from ratel.ir.budget import Budget, ssd_dirs
from ratel.ir.layout import ceil_div, compute_copy_bytes, program_pool_bytes, store_pool_bytes
from ratel.runtime.activations import ActivationStore
from ratel.runtime.cpu_adam import optimizer_threads
from ratel.runtime.engine import Runtime
from ratel.runtime.memory import Lanes, PinnedPool, SharedPool, expandable_segments
from ratel.runtime.optimizer import CPUOptimizer, Hyper
from ratel.runtime.param_store import ParamStore, materialise_module
from ratel.runtime.saved import SavedActivations, SsdSaved
from ratel.runtime.ssd import SsdParams, SsdStates, model_key
from ratel.runtime.ssd_lane import SsdLane
from ratel.runtime.swapper import Swapper


@dataclass
class Program:
    """One traced input shape: its rewritten graph, its Plan, the Runtime executing them, its pinned pool."""

    gm: fx.GraphModule
    plan: Plan
    runtime: Runtime
    pool: PinnedPool | None

    @property
    def pinned_bytes(self) -> int:
        return self.pool.capacity if self.pool is not None else 0

    def releases(self) -> list:
        """What freeing the program takes, in order: its step state, its SSD activation staging, its pool."""
        out = [self.runtime.finish_step]
        if self.runtime.saved.ssd is not None:
            out.append(self.runtime.saved.ssd.close)
        if self.pool is not None:
            out.append(self.pool.close)
        return out

    def release(self) -> None:
        for release in self.releases():
            release()


class Resources:
    """What the programs of one engine share, created from its first plan (see the module docstring)."""

    def __init__(self, model: nn.Module, device: torch.device, budget: Budget, *, weights=None,
                 progress: bool = True, keep_swap_files: bool = False, checkpoint=None, optimizer_step: int = 0,
                 ranks=None):
        self.model = model
        self.ranks = ranks                      # data-parallel ranks (ratel.runtime.ranks), or None
        self.checkpoint = checkpoint            # a TensorSet to resume from, read once by create()
        self.optimizer_step = optimizer_step
        self.device = device
        self.budget = budget
        self.weights = weights
        self.progress = progress
        self.keep_swap_files = keep_swap_files
        self.lanes = Lanes(device)
        if device.type == "cuda":   # the plan counts tensor bytes: the allocator must not strand memory between them
            expandable_segments()
        self.store: ParamStore | None = None
        self.store_pool: PinnedPool | None = None
        self.shared_pool: SharedPool | None = None   # with ranks: the compute copies, one per host
        self.optimizer: CPUOptimizer | None = None
        self.swapper: Swapper | None = None
        self.lane: SsdLane | None = None
        self.ssd: SsdStates | None = None
        self.buffers: dict[str, torch.Tensor] | None = None

    @property
    def key(self) -> str:
        """The folder of this engine's swap files under each SSD folder (one per rank: ranks share the SSDs)."""
        key = model_key(self.model)
        return f"{key}-rank{self.ranks.rank}" if self.ranks is not None else key

    @property
    def created(self) -> bool:
        return self.store is not None

    def ssd_lane(self) -> SsdLane:
        """The one SSD lane every SSD tier of this engine's programs reads and writes through."""
        if self.lane is None:
            self.swapper = Swapper(dirs=ssd_dirs(self.budget.ssd_dir))
            self.lane = SsdLane(self.swapper)
        return self.lane

    def create(self, plan: Plan, traced, hyper: Hyper, *, segments: dict, norm_order: tuple, accumulate: int,
               max_grad_norm: float | None) -> None:
        """Materialise the parameters and states the plan places (once, from the first plan)."""
        if plan.memory.ssd_total:
            # The ranks of one host share its SSDs: each puts its own copy there.
            on_host = self.ranks.local_world if self.ranks is not None else 1
            check_ssd_space(plan.memory.ssd_total * on_host, ssd_dirs(self.budget.ssd_dir), self.key)
        ssd_groups = [g for g in plan.groups if g.trainable and plan.placement.optimizer_tier_of(g.name) == Tier.SSD]
        if ssd_groups:
            self.ssd = SsdStates(self.ssd_lane(), ssd_groups, self.key,
                                 order=plan.ssd_state_order())
        params_on_ssd = [g for g in plan.groups if plan.placement.param_tier_of(g.name) == Tier.SSD]
        on_ssd = {g.name for g in params_on_ssd}
        pin = self.device.type == "cuda"
        shared = self.ranks is not None    # the ranks of this host map one copy of the weights
        self.store_pool = PinnedPool(store_pool_bytes(plan.groups, on_ssd, accumulate, max_grad_norm is not None,
                                                      shared_copies=shared, on_gpu=set(plan.placement.gpu_groups),
                                                      ranks=self.ranks.world if self.ranks is not None else 1),
                                     pin=pin)
        self.shared_pool = (SharedPool(compute_copy_bytes(plan.groups, on_ssd), pin, self.ranks) if shared
                            else None)
        ssd_params = (SsdParams(self.ssd_lane(), params_on_ssd, self.key, self.store_pool)
                      if params_on_ssd else None)
        self.store = ParamStore(plan, self.device, self.store_pool, ssd=self.ssd, ssd_params=ssd_params,
                                accumulate=accumulate, clip=max_grad_norm is not None, ranks=self.ranks,
                                compute_pool=self.shared_pool, lanes=self.lanes)
        self.store.load(self.model, self.weights, progress=self.progress, checkpoint=self.checkpoint,
                        step=self.optimizer_step)
        if self.checkpoint is not None:
            self.checkpoint.close()
            self.checkpoint = None
        self.optimizer = CPUOptimizer(self.store, hyper, ssd=self.ssd, segments=segments, accumulate=accumulate,
                                      max_grad_norm=max_grad_norm, norm_order=norm_order, ranks=self.ranks,
                                      threads=self._optimizer_threads())
        self.buffers = load_buffers(self.model, traced, self.device)

    def _optimizer_threads(self) -> int:
        """The CPU AdamW's threads (``optimizer_threads``). With ranks, the host's cores are shared among them:
        torchrun sets OMP_NUM_THREADS=1 when the user has not, which would leave the CPU optimizer, the longest
        lane of a small batch, one core."""
        return optimizer_threads(self.ranks.local_world if self.ranks is not None else 1)

    def program(self, gm: fx.GraphModule, plan: Plan) -> Program:
        """The Runtime of one plan, over the shared store, with a pinned pool of its own for activations."""
        if tuple(g.params for g in plan.groups) != tuple(g.params for g in self.store.groups):
            raise RatelError("a new input shape changed how parameters are grouped; this is a Ratel bug")
        act_bytes = program_pool_bytes(plan.placement.activations, plan.activations)
        pool = PinnedPool(act_bytes, pin=self.device.type == "cuda") if act_bytes else None
        activations = ActivationStore(self.lanes, pool, self.device)
        ssd_saved = None
        if any(d.tier == Tier.SSD for u in plan.activations.units for d in u.decisions):
            layout = tuple((u.unit, d.key, d.nbytes) for u in plan.activations.units for d in u.decisions
                           if d.tier == Tier.SSD)
            name = f"{self.key}/activations-{hashlib.sha1(repr(layout).encode()).hexdigest()[:10]}"
            ssd_saved = SsdSaved(self.ssd_lane(), plan.activations, pool, name)
        saved = SavedActivations(self.lanes, pool, self.device, ssd_saved)
        runtime = Runtime(gm, plan, self.store, self.buffers, self.lanes, activations, self.optimizer, saved,
                          ssd_lane=self.lane)
        return Program(gm, plan, runtime, pool)

    def host_bytes_allocated(self, programs) -> int:
        """Host memory held right now (pinned pools, masters, Adam states, staging, accumulation sums)."""
        storages: dict[int, int] = {}

        def add(t):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                s = t.untyped_storage()
                storages.setdefault(s.data_ptr(), s.nbytes())

        if self.store_pool is not None:
            add(self.store_pool.buffer)
        shared = 0
        if self.shared_pool is not None:      # this rank's share of the one copy its host's ranks map
            shared = self.shared_pool.capacity // self.ranks.local_world
            storages[self.shared_pool.buffer.untyped_storage().data_ptr()] = 0    # (fp32 masters are views of it)
        if self.store is not None:
            for table in (self.store.master, self.store.exp_avg, self.store.exp_avg_sq):
                for t in table.values():
                    add(t)
        for program in programs:
            if program.pool is not None:
                add(program.pool.buffer)
        if self.ssd is not None:
            for b in self.ssd.buffers:
                add(b)
        if self.optimizer is not None:
            for t in self.optimizer.acc.values():
                add(t)
        return sum(storages.values()) + shared

    def closers(self) -> list:
        """What closing takes, in order (the caller runs each and collects errors)."""
        out = []
        if self.optimizer is not None:
            out.append(self.optimizer.close)
        return out

    def close_storage(self) -> list:
        out = []
        if self.store_pool is not None:
            out.append(self.store_pool.close)
        if self.shared_pool is not None:
            out.append(self.shared_pool.close)
        if self.ssd is not None:
            out.append(self.ssd.close)
        if self.lane is not None:
            out.append(self.lane.close)
        if self.swapper is not None:
            swapper = self.swapper
            out.append(lambda: swapper.close(remove=not self.keep_swap_files))
        if self.store is not None:
            out.append(self.store.drop)
        # Whatever else still points at the store (the optimizer, a caller's engine) must not keep its host
        # memory alive: close() frees it, the engine object may live on.
        self.store = self.store_pool = self.shared_pool = self.ssd = self.lane = self.swapper = None
        self.optimizer = self.buffers = None
        return out


def check_ssd_space(needed: int, dirs: list[str], key: str) -> None:
    """Refuse, before any swap file is written, a plan whose SSD bytes do not fit the free space of its folders
    (swap files are striped evenly; files a previous run of this model left there are reused)."""
    share = ceil_div(needed, max(1, len(dirs)))
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


def load_buffers(model: nn.Module, traced, device: torch.device) -> dict[str, torch.Tensor]:
    """Buffers and lifted constants on the device; meta buffers are rebuilt by the model's initialiser."""
    out: dict[str, torch.Tensor] = {}
    wanted = {name for _, name in traced.buffers}
    constants = dict(traced.constants)
    for name in sorted(wanted):
        value = constants[name] if name in constants else model.get_buffer(name)
        if isinstance(value, torch.Tensor) and value.is_meta:
            value = rebuild_meta_buffer(model, name)
        if isinstance(value, torch.Tensor):
            value = value.detach().to(device)
        out[name] = value
    return out


def rebuild_meta_buffer(model: nn.Module, name: str) -> torch.Tensor:
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
