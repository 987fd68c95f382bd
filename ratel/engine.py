"""The training lifecycle: ``Engine`` runs a compiled model's programs, one per input shape, over one set of
parameters, optimizer states and SSD tiers (``ratel.runtime.assemble.Resources``), and keeps the model object
pointing at the weights it trains.

Every new input shape (batch and sequence sizes may change between steps) is planned once
(``ratel.passes.plan_call``; from the second shape on its graph comes from one symbolic capture of the
model, ``ratel.shape_trace``, instead of a new export) and kept in a ``ProgramCache`` bounded by the host
memory its pinned pools take (and by a count, 128, that only a CPU engine, whose programs pin nothing,
reaches).
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import hashlib
import logging
import weakref
from pathlib import Path

import torch
import torch.utils._pytree as pytree
from torch import nn

from ratel.checkpoint import Checkpoint, Resumed, restore_rng, save as save_checkpoint
from ratel.errors import BudgetError, RatelError
from ratel.runtime.tensor_files import CheckpointError
from ratel.ir import Plan, TransferKind as K, canonical_parameter_names, format_bytes
from ratel.ir.budget import Budget
from ratel.ir.hardware import HardwareProfile
from ratel.ir.layout import program_pool_bytes
from ratel.ir.printer import format_graph
from ratel.optim import EngineOptimizer, build_param_groups, norm_order, segments_of
from ratel.passes import plan_call, resident_choice
from ratel.passes.plan_activations import POLICIES
from ratel.program_cache import ProgramCache
from ratel.shape_trace import TraceCache
from ratel.runtime.assemble import Program, Resources, persistent_buffers, rebuild_meta_buffer
from ratel.runtime.memory import return_freed_host_memory
from ratel.runtime.optimizer import Hyper
from ratel.runtime.recorder import Recorder
from ratel.trace import after_tracing, call_kwargs, capturing, run_after_tracing

log = logging.getLogger("ratel")

# Engines not closed yet, closed when the interpreter exits (``_close_open_engines``).
_OPEN_ENGINES: "weakref.WeakSet[Engine]" = weakref.WeakSet()


@atexit.register
def _close_open_engines() -> None:
    """Close the engines a program leaves open, while their worker threads (the CPU AdamW, the SSD lane, the
    checkpoint read-ahead) can still finish: once Python finalizes, a daemon thread that wakes up is ended
    from inside whatever C++ call it is in, and a noexcept frame there aborts the process. A script that
    trained and ended without ``close()`` exited with status 134 ("terminate called without an active
    exception") about four times in five when updates were still running. Swap files are removed as
    ``close`` removes them (nothing else did: a script that never closed its engine left them in ssd_dir);
    the model objects are not given a copy of the weights (the process is ending)."""
    for engine in list(_OPEN_ENGINES):
        try:
            engine._close(keep_model=False)
        except Exception as exc:  # noqa: BLE001 - the next engine still closes; the process is ending
            log.warning("ratel: closing an engine at exit failed: %s", exc)


def _schedule_fingerprint(plan: Plan) -> int:
    """What the ranks' collectives follow (the parameter groups and when each gradient goes out and each
    update is issued), as a number every rank must agree on."""
    collective = (K.FLUSH_GRADS, K.OPTIMIZER_STEP, K.GPU_STEP)
    text = repr(([(g.name, g.numel, g.update_unit) for g in plan.groups],
                 [(t.kind.value, t.subject, t.step) for t in plan.transfers if t.kind in collective]))
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:7], "little")


class LogitsNotKept:
    """Stands in an output for the logits Ratel did not compute: the loss was computed from the LM head over
    chunks of tokens. Any use raises and says how to keep them."""

    _MESSAGE = ("the logits were not kept: Ratel computes the loss from the LM head over chunks of tokens and "
                "never holds all of them. Pass ratel.compile(..., keep_logits=True) to have them returned (they "
                "cost batch x seq x vocabulary elements on the GPU), or call the engine without labels")

    def __getattr__(self, name):
        raise RatelError(self._MESSAGE)

    def __getitem__(self, index):
        raise RatelError(self._MESSAGE)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise RatelError(cls._MESSAGE)

    def __bool__(self):
        raise RatelError(self._MESSAGE)

    def __repr__(self) -> str:
        return "<logits not kept: ratel.compile(..., keep_logits=True) returns them>"


class Engine:
    """Trains a compiled model: ``engine(**batch).loss``, ``engine.backward(loss)``, ``engine.step()``."""

    def __init__(self, model: nn.Module, budget: Budget, optimizer, device: torch.device,
                 hardware: HardwareProfile, weights=None, depth: int = 2, max_programs: int = 128,
                 progress: bool = True, keep_swap_files: bool = False, activations: str = "auto",
                 accumulate: int = 1, max_grad_norm: float | None = None, resume: Checkpoint | None = None,
                 keep_logits: bool = False, ranks=None, resident=None):
        if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
            raise ValueError(f"accumulate={accumulate!r}: give the number of micro-batches per update, an int >= 1")
        if max_grad_norm is not None and not (float(max_grad_norm) > 0):
            raise ValueError(f"max_grad_norm={max_grad_norm!r}: give a positive norm (e.g. 1.0), or None for no "
                             "clipping")
        self.model = model
        self.device = device
        self.hardware = hardware
        #: the data-parallel ranks this engine is one of (``ratel.runtime.ranks.Ranks``), or None
        self._ranks = ranks
        self.budget = budget.resolved(hardware)
        if ranks is not None:    # host memory and SSD budgets are per host: its ranks share them
            self.budget = dataclasses.replace(self.budget, host=self.budget.host // ranks.local_world,
                                              ssd=None if self.budget.ssd is None
                                              else self.budget.ssd // ranks.local_world)
        self.accumulate = accumulate
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        groups, defaults, self._group_of = build_param_groups(model, optimizer)
        #: a torch.optim.Optimizer: its param_groups carry lr, betas, eps, weight_decay for the next update,
        #: so torch LR schedulers drive it; ``engine.optimizer.step()`` is ``engine.step()``
        self.optimizer = EngineOptimizer(groups, defaults, self._step)
        self.depth = depth
        self.keep_logits = bool(keep_logits)
        self._split_blocks: bool | None = None   # whole blocks or halves: decided by the first program
        # Groups kept on the GPU (plan_resident_groups): chosen by the first program (or named by the user),
        # kept by the others.
        self._resident, self._resident_groups = resident_choice(resident)
        self.max_programs = max_programs
        self.progress = progress
        self._weights = weights
        self._training = model.training
        #: update cycles completed (``step()`` calls), counted across resumes
        self.global_step = 0
        self._resume = resume
        self.resumed: Resumed | None = None
        if resume is not None:
            self._take_hyperparameters(resume)
            self.global_step = resume.step
        self._resources = Resources(model, device, self.budget, weights=weights, progress=progress,
                                    keep_swap_files=keep_swap_files,
                                    checkpoint=resume.tensors() if resume is not None else None,
                                    optimizer_step=resume.state["optimizer_step"] if resume is not None else 0,
                                    ranks=ranks)
        self._programs = ProgramCache(max_programs)
        self._traces = TraceCache()        # one symbolic capture per call signature, shared by its shapes
        self.keep_swap_files = keep_swap_files
        self._activations = activations
        self._latest: tuple | None = None
        self._closed = False
        self.profile = False               # record every step: engine.last_step, plan.summary(measured=...)
        self.last_step = None
        self._recorder = None
        self._bound: list[tuple[nn.Parameter, torch.Tensor]] = []   # model parameters aliasing Ratel's copies
        _OPEN_ENGINES.add(self)

    # ------------------------------------------------------------------ programs
    def _key(self, flat: list, spec) -> tuple:
        shapes = tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else ("value", x) for x in flat)
        return (self._training, str(spec), shapes)

    def _program(self, args: tuple, kwargs: dict) -> tuple[Program, list]:
        kwargs = call_kwargs(self.model, kwargs)
        flat, spec = pytree.tree_flatten((args, kwargs))
        key = self._key(flat, spec)
        program = self._programs.get(key)
        if program is None:
            program = self._build(args, kwargs)
            self._programs.put(key, program, self._program_room(program.plan))
        return program, flat

    def _program_room(self, plan: Plan) -> int:
        """Pinned bytes the cached programs may hold together: the host budget less what the shared state
        takes (the plan's host total counts one program's pool)."""
        shared = plan.memory.host_total - program_pool_bytes(plan.placement.activations, plan.activations)
        return max(0, self.budget.host - shared)

    def _build(self, args: tuple, kwargs: dict) -> Program:
        self._check_open("run a forward")
        with self._rank0_plans_first():
            traced, gm, plan = self._plan(args, kwargs)
        program = self._assemble(traced, gm, plan, args)    # loading takes every rank at once (collectives)
        if self._ranks is not None:
            self._ranks.same_everywhere(_schedule_fingerprint(program.plan), "the plan of this input shape",
                                        "every rank must run the same input shapes (the same batch and sequence "
                                        "sizes at each step) with the same budget and options")
        return program

    @contextlib.contextmanager
    def _rank0_plans_first(self):
        """With several ranks, rank 0 plans first and the others after it: the unit times it measures are
        cached for the host (``ratel.passes.time_units``), so every rank plans with the same times, hence the
        same schedule, instead of each timing its units while the others load the GPUs."""
        ranks = self._ranks
        if ranks is None:
            yield
            return
        if self._optimizer is not None:
            self._optimizer.wait_all()    # its worker's collectives are over before this thread's
        if ranks.rank != 0:
            ranks.barrier()
        try:
            yield
        finally:
            if ranks.rank == 0:
                ranks.barrier()

    def _plan(self, args: tuple, kwargs: dict):
        try:
            # Every program shares one parameter store, so all take the units the first one took.
            traced, gm, plan = plan_call(self.model, args, kwargs, self.budget, self.hardware, self.device,
                                         training=self._training, depth=self.depth, activations=self._activations,
                                         accumulate=self.accumulate, clip=self.max_grad_norm is not None,
                                         keep_logits=self.keep_logits, split_blocks=self._split_blocks,
                                         traces=self._traces, ranks=self.world_size,
                                         resident=self._resident, resident_groups=self._resident_groups)
        except BudgetError as error:
            if error.tier != "gpu":
                raise
            hints = []
            if self._split_blocks is False:
                hints.append("This engine's units are whole blocks, as its first input shape was planned; cutting "
                             "blocks in two may fit this shape.")
            if self._resident_groups:
                why = "as its first input shape was planned" if self._latest is not None else "as compile named them"
                hints.append(f"This engine keeps {len(self._resident_groups)} parameter groups on the GPU "
                             f"({', '.join(self._resident_groups)}), {why}; "
                             "compile(resident=False) streams them all.")
            if not hints:
                raise
            raise BudgetError(f"{error}\n{' '.join(hints)} Or compile with the largest shape as example_inputs.",
                              tier="gpu", needed=error.needed, budget=error.budget) from None
        self._split_blocks = traced.split_blocks
        # The parameter store holds the first plan's groups on the GPU: every later shape keeps them there.
        self._resident_groups = plan.placement.gpu_groups
        return traced, gm, plan

    def _assemble(self, traced, gm, plan: Plan, args: tuple) -> Program:
        if not self._resources.created:
            self._resources.create(plan, traced, Hyper.of(self.optimizer.defaults),
                                   segments=segments_of(plan.groups, self._group_of),
                                   norm_order=norm_order(self.model, plan.groups), accumulate=self.accumulate,
                                   max_grad_norm=self.max_grad_norm)
            self._bind_model()
            if self._resume is not None:
                # Last, after anything planning or loading might draw: the next step draws what it drew then.
                restore_rng(self._resume.state, self.device)
                self.resumed = Resumed(self._resume.step, self._resume.state.get("state"),
                                       self._resume.state.get("scheduler"), self._resume.folder)
                self._resume = None
        program = self._resources.program(gm, plan)
        log.info("ratel: planned %s (peak GPU %s of %s, host %s)", [tuple(a.shape) for a in args
                 if isinstance(a, torch.Tensor)], format_bytes(plan.memory.gpu_peak),
                 format_bytes(plan.budget_gpu), format_bytes(plan.memory.host_total))
        return program

    @property
    def _store(self):
        return self._resources.store

    @property
    def _optimizer(self):
        return self._resources.optimizer

    @property
    def _buffers(self):
        return self._resources.buffers

    # ------------------------------------------------------------------ training
    def __call__(self, *args, **kwargs):
        self._check_open("run a forward")
        run_after_tracing()
        args = tuple(self._to_device(a) for a in args)
        kwargs = {k: self._to_device(v) for k, v in kwargs.items()}
        program, flat = self._program(args, kwargs)
        gm, plan, runtime = program.gm, program.plan, program.runtime
        if self._latest is not None and self._latest.runtime is not runtime:
            self._latest.runtime.finish_step()
        self._latest = program
        self._recorder = Recorder(self.device, len(plan.steps)) if self.profile and torch.is_grad_enabled() else None
        runtime.begin(self._recorder)
        out_flat = list(gm(runtime, *flat))
        if not torch.is_grad_enabled():
            runtime.finish_step()
        for index in gm.meta.get("ratel.dropped_outputs", ()):
            out_flat[index] = LogitsNotKept()
        return pytree.tree_unflatten(out_flat, self._out_spec(gm))

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
        runtime = self._latest.runtime
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
        self.global_step += 1
        if self._recorder is not None:
            self.last_step = self._recorder.finish()
            self._recorder = None

    @property
    def rank(self) -> int:
        """This process's rank among the data-parallel ranks (0 with one process)."""
        return self._ranks.rank if self._ranks is not None else 0

    @property
    def world_size(self) -> int:
        """The number of data-parallel ranks (``torchrun --nproc-per-node``); 1 with one process."""
        return self._ranks.world if self._ranks is not None else 1

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
        if policy not in POLICIES:
            raise ValueError(f"activations={policy!r}: choose one of {POLICIES}")
        self._check_open("change the activation policy")
        if self._optimizer is not None:
            self._optimizer.wait_all()
        for program in self._programs.clear():
            program.release()
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

    # ------------------------------------------------------------------ checkpoints
    def save(self, path, *, scheduler=None, state=None, max_shard_size: int | str = "5GB",
             extra_files: dict[str, bytes] | None = None) -> Path:
        """Write a checkpoint that ``ratel.compile(..., resume=path)`` continues from exactly: the weights as
        Hugging Face safetensors with config.json (``from_pretrained(path)`` loads them), fp32 masters and
        Adam states (SSD-resident ones streamed from their swap files), the update count, the param groups,
        ``scheduler.state_dict()``, the RNG states and ``state`` (anything JSON-serialisable: the data
        position), and ``extra_files`` (name -> bytes: a tokenizer's files). Atomic: a crash leaves the previous
        checkpoint, or this one, complete. Call it after ``step()``."""
        self._check_open("save a checkpoint")
        return save_checkpoint(self, path, scheduler=scheduler, state=state, max_shard_size=max_shard_size,
                               extra_files=extra_files, progress=self.progress)

    def restore_scheduler(self, scheduler) -> None:
        """After ``compile(..., resume=)``: load the LR scheduler state saved with ``engine.save(scheduler=)``
        and put back the learning rates the next update uses (creating a scheduler resets them)."""
        if self.resumed is None:
            raise RatelError("restore_scheduler() needs an engine compiled with resume=<checkpoint> (and "
                             "example_inputs, or after its first forward)")
        if self.resumed.scheduler is None:
            raise RatelError(f"the checkpoint {self.resumed.folder} holds no scheduler state: pass "
                             "engine.save(path, scheduler=sched) when saving")
        scheduler.load_state_dict(self.resumed.scheduler)
        self._put_back_hyperparameters()

    def _take_hyperparameters(self, resume: Checkpoint) -> None:
        saved = resume.state["param_groups"]
        if len(saved) != len(self.optimizer.param_groups):
            raise CheckpointError(f"{resume.folder}: saved with {len(saved)} optimizer param groups, the optimizer "
                                  f"given has {len(self.optimizer.param_groups)}: build the param groups as when saving")
        self._resume_groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in saved]
        self._put_back_hyperparameters()

    def _put_back_hyperparameters(self) -> None:
        for group, hyper in zip(self.optimizer.param_groups, self._resume_groups):
            group.update(hyper)

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
        return self._latest.plan

    @property
    def graph(self) -> str:
        if self._latest is None:
            raise RatelError("no graph yet: compile with example_inputs or run a forward first")
        return format_graph(self._latest.gm)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The model's persistent state under its own names, as CPU tensors: the fp32 master of every
        parameter (frozen ones: their values) and the persistent buffers, so
        ``fresh_model.load_state_dict(engine.state_dict())`` loads strictly. Waits for updates in flight.
        With several ranks it is a collective: every rank calls it (each updates only its slice of the masters)."""
        self._check_open("read the state_dict")
        if self._store is None:
            raise RatelError("no parameters yet: compile with example_inputs or run a forward first")
        if self._optimizer is not None:
            self._optimizer.wait_all()
        params = self._store.state_dict(self.model)
        out = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            out[name] = params[name] if name in params else p.detach().cpu().clone()
        return {**out, **self.state_dict_buffers()}

    def state_dict_buffers(self) -> dict[str, torch.Tensor]:
        """The model's persistent buffers, as CPU tensors (the ones Ratel holds on the device, or rebuilt)."""
        out = {}
        for name, buf in persistent_buffers(self.model):
            if name in (self._buffers or {}):
                out[name] = self._buffers[name].detach().cpu().clone()
            elif buf.is_meta:
                out[name] = rebuild_meta_buffer(self.model, name).detach().clone()
            else:
                out[name] = buf.detach().cpu().clone()
        return out

    def host_bytes_allocated(self) -> int:
        """Host memory Ratel holds right now (pinned pools, masters, Adam states, staging), to check against
        ``Budget.host``."""
        return self._resources.host_bytes_allocated(self._programs.programs())

    def close(self) -> None:
        """Free pinned memory, device memory and swap files; the engine cannot be used afterwards.

        Every resource is released even if one step fails; the first error is raised at the end.
        """
        self._close(keep_model=True)

    def _close(self, keep_model: bool) -> None:
        """``close``; ``keep_model``: give the model object a copy of the weights Ratel's memory held (not
        when the process is exiting: for a large model that copy is the whole model again)."""
        if self._closed:
            return
        self._closed = True
        _OPEN_ENGINES.discard(self)
        errors: list[BaseException] = []

        def attempt(action) -> None:
            try:
                action()
            except BaseException as exc:  # noqa: BLE001 - collected, re-raised below
                errors.append(exc)

        for action in self._resources.closers():
            attempt(action)
        if keep_model:
            attempt(self._unbind_model)
        for program in self._programs.clear():
            for release in program.releases():
                attempt(release)
        self._latest = None
        for action in self._resources.close_storage():
            attempt(action)
        attempt(return_freed_host_memory)
        if errors:
            raise errors[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "_closed", True):  # closed, or __init__ failed before it held anything
            return
        # The cyclic GC may collect a dropped engine in the middle of another model's capture; closing copies
        # weights into the model object, and those copies would be traced into that graph. Held back, it
        # stays in the set the exit hook closes (the GC may have cleared it from there already).
        _OPEN_ENGINES.add(self)
        after_tracing(self._close_dropped)

    def _close_dropped(self) -> None:
        try:
            self.close()
        except Exception as exc:  # noqa: BLE001 - a finalizer has no caller to raise to
            log.warning("ratel: closing an engine that was not closed failed: %s", exc)

    # ------------------------------------------------------------------ helpers
    def _to_device(self, value):
        if isinstance(value, torch.Tensor) and value.device != self.device:
            return value.to(self.device, non_blocking=True)
        return value

    @staticmethod
    def _out_spec(gm):
        return gm.meta["ratel.out_spec"]
