"""Runtime: executes a rewritten program and its Plan.

Forward is the top-level graph: its ``ratel.*`` nodes prefetch and wait for parameters, run units and
checkpoint their outputs. Each unit runs inside ``UnitFunction`` (an autograd Function): its forward runs
without autograd, its backward is driven by autograd in reverse unit order and does, at backward step t:
  1. the transfers the plan issues at t (next residency's parameters, next step's activations);
  2. wait for this unit's parameters and inputs, replay the unit's RNG state, recompute its forward with
     autograd on, and backpropagate the incoming gradients into its inputs and into flat gradient buffers
     (one per parameter group, so a group read by several units accumulates in place, like PyTorch's
     AccumulateGrad);
  3. copy each complete group gradient to pinned host memory and hand the group to the CPU optimizer;
  4. release what the plan releases at t.
On CUDA, copies run on their own streams ordered by events; on CPU every copy is immediate and the
"GPU tier" is another host buffer, so the same code path runs in CI.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from ratel.errors import RatelError
from ratel.ir import META_TRANSFER, META_UNIT_CALL, Plan, Stage, TransferKind as K, UnitCall, step_index
from ratel.runtime.activations import ActivationStore
from ratel.runtime.memory import Lanes
from ratel.runtime.optimizer import CPUOptimizer
from ratel.runtime.param_store import ParamStore
from ratel.runtime.saved import SavedActivations
from ratel.runtime.schedule import ScheduleExecutor

log = logging.getLogger("ratel.runtime")


@dataclass
class _RngState:
    cpu: torch.Tensor
    device: torch.Tensor | None


class UnitFunction(torch.autograd.Function):
    """One unit: forward without saving anything, backward by recompute (see the module docstring)."""

    @staticmethod
    def forward(ctx, runtime: "Runtime", unit: int, _anchor: torch.Tensor, *inputs):
        ctx.runtime = runtime
        ctx.unit = unit
        ctx.generation = runtime.generation
        ctx.set_materialize_grads(False)
        outputs = runtime.forward_unit(unit, inputs)
        input_storages = {x.untyped_storage().data_ptr() for x in inputs if isinstance(x, torch.Tensor)}
        # An output aliasing an input would make autograd treat it as a view; outputs are fresh tensors.
        outputs = tuple(o.clone() if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() in input_storages
                        else o for o in outputs)
        ctx.mark_non_differentiable(*[o for o in outputs
                                      if isinstance(o, torch.Tensor) and not o.is_floating_point()])
        return outputs

    @staticmethod
    def backward(ctx, *grad_outputs):
        if ctx.generation != ctx.runtime.generation:
            raise RatelError("backward through a forward that is no longer current: Ratel keeps the state of the "
                             "latest forward only; call backward before the next forward")
        grads = ctx.runtime.backward_unit(ctx.unit, grad_outputs)
        return (None, None, None, *grads)


class Runtime:
    """The state of one program (one traced shape): its plan, units and per-step bookkeeping."""

    def __init__(self, gm: fx.GraphModule, plan: Plan, store: ParamStore, buffers: dict[str, torch.Tensor],
                 lanes: Lanes, activations: ActivationStore, optimizer: CPUOptimizer | None,
                 saved: SavedActivations | None = None, ssd_lane=None):
        self.gm = gm
        self.plan = plan
        self.store = store
        self.buffers = buffers
        self.lanes = lanes
        self.activations = activations
        self.saved = saved or SavedActivations(lanes, None, lanes.device)
        self.optimizer = optimizer
        self.ssd_lane = ssd_lane      # the engine's one SSD lane (shared by its programs), None without an SSD tier
        self.device = lanes.device
        self.calls: dict[int, UnitCall] = {}
        self.unit_index: dict[str, int] = {}
        for node in gm.graph.nodes:
            call = node.meta.get(META_UNIT_CALL)
            if call is not None:
                self.calls[call.unit] = call
                self.unit_index[call.name] = call.unit
        self.modules = {u: getattr(gm, c.module) for u, c in self.calls.items()}
        self.fwd_step, self.bwd_step = step_index(plan.steps)
        self.generation = 0
        self._slot_of: dict[int, int] = {}
        self._ready: dict[int, Any] = {}
        self._rng: dict[int, _RngState] = {}
        self._grad_buffers: dict[int, torch.Tensor] = {}
        self._anchor = torch.zeros((), requires_grad=True)
        self.pending_backward = False
        self.recorder = None
        self._step = -1
        self._flushed: dict[int, tuple] = {}      # group -> (D2H copy event, per-parameter norms)
        index_of = {t: i for i, t in enumerate(plan.transfers)}
        graph_bound = {index_of[n.meta[META_TRANSFER]] for n in gm.graph.nodes
                       if n.meta.get(META_TRANSFER) in index_of}
        self.schedule = ScheduleExecutor(plan, {
            K.FETCH_PARAMS: lambda t: self._fetch_params(t.unit, t.slot),
            K.RELEASE_PARAMS: lambda t: self._release_params(t.unit),
            K.SSD_READ_PARAMS: self._read_params_from_ssd,
            K.OFFLOAD_ACTIVATION: lambda t, value: self.activations.offload(t.value, value)
            if torch.is_grad_enabled() else None,
            K.FETCH_ACTIVATION: lambda t: self.activations.fetch(t.value),
            K.RELEASE_ACTIVATION: lambda t: self.activations.release(t.value),
            K.SSD_READ_SAVED: lambda t: self.saved.read_ahead(t.unit),     # per unit: the first of its values
            K.FETCH_SAVED: lambda t: self.saved.fetch(t.unit),
            K.FLUSH_GRADS: lambda t: self._flush_grads(t.unit),
            K.OPTIMIZER_STEP: self._optimizer_step,
            K.GPU_STEP: self._gpu_step,
        }, graph_bound)
        self.saved.schedule = self.schedule

    # ------------------------------------------------------------------ forward ops (called by the graph)
    def begin(self, recorder=None) -> None:
        """Start a forward: drop whatever an unfinished previous step left behind."""
        self.recorder = recorder
        self.schedule.begin()
        self._drop_unsubmitted()
        self._attach_schedule()
        self.activations.recorder = recorder
        self.saved.recorder = recorder
        if self.ssd_lane is not None:
            self.ssd_lane.recorder = recorder
        self.saved.clear()
        self._set_step(0)
        self.generation += 1
        self._slot_of.clear()
        self._ready.clear()
        self._rng.clear()
        self._grad_buffers.clear()
        self.activations.clear()
        self.pending_backward = torch.is_grad_enabled()
        if self.pending_backward and self.optimizer is not None:
            self.optimizer.begin_step()

    def _set_step(self, step: int) -> None:
        self._step = step
        self.activations.step = step
        self.saved.step = step
        if self.ssd_lane is not None:
            self.ssd_lane.step = step
        if self.recorder is not None:
            self.recorder.enter_step(step)

    def _span(self, lane: str, label: str):
        return self.recorder.span(lane, label, self._step) if self.recorder is not None else contextlib.nullcontext()

    def _attach_schedule(self) -> None:
        """The owners of dynamic transfers (shared by every program) report to this program's executor."""
        for owner in (self.optimizer, self.store.ssd):
            if owner is not None:
                owner.schedule = self.schedule

    def prefetch_params(self, unit: str | int, slot: int) -> None:
        """The graph's ``ratel.prefetch_params`` node: the schedule issues it (and what comes before it)."""
        index = self.unit_index[unit] if isinstance(unit, str) else unit
        self.schedule.run_through(K.FETCH_PARAMS, unit=index)

    def _fetch_params(self, index: int, slot: int) -> None:
        if self._slot_of.get(index) == slot:
            return
        for group, view in self.store.slot_group_views(index, slot):
            if self.optimizer is not None and group.trainable:
                self.optimizer.wait(group.index)   # never stream a weight the optimizer is still writing
        ready = None
        free = self.store.slot_free.pop(slot, None)
        for group, view in self.store.slot_group_views(index, slot):
            on_ssd = self.store.params_on_ssd(group)
            source = self.store.ssd_params.acquire(group) if on_ssd else self.store.compute[group.index]
            ready = self.lanes.copy(view, source, self.lanes.h2d, after=free,
                                    span=(self.recorder, "h2d", f"params {group.name}", self._step))
            if on_ssd:
                self.store.ssd_params.release(group, ready)
            free = None
        self._slot_of[index] = slot
        self._ready[index] = ready

    def _read_params_from_ssd(self, t) -> None:
        """Start reading a residency's SSD-resident parameter groups into the staging ring."""
        if self._slot_of.get(t.unit) == t.slot:
            return    # still resident in that slot: its fetch will not copy, so nothing to stage
        for group, _ in self.store.slot_group_views(t.unit, t.slot):
            if self.store.params_on_ssd(group):
                self.store.ssd_params.read_ahead(group)

    def wait_params(self, unit: str | int) -> None:
        index = self.unit_index[unit] if isinstance(unit, str) else unit
        if index not in self._slot_of:
            raise RatelError(f"unit {self.calls[index].name} runs before its parameters were fetched (plan bug)")
        self.lanes.wait_compute(self._ready.pop(index, None))

    def release_params(self, unit: str | int) -> None:
        """The graph's ``ratel.release_params`` node."""
        index = self.unit_index[unit] if isinstance(unit, str) else unit
        self.schedule.run_through(K.RELEASE_PARAMS, unit=index)

    def _release_params(self, index: int) -> None:
        slot = self._slot_of.pop(index)
        self.store.slot_free[slot] = self.lanes.event()

    def offload_activation(self, name: str, value) -> None:
        """The graph's ``ratel.offload_activation`` node (a no-op without autograd: nothing will read it)."""
        self.schedule.run_through(K.OFFLOAD_ACTIVATION, value, value=name)

    def keep_activation(self, name: str, value) -> None:
        if torch.is_grad_enabled():
            self.activations.keep(name, value)

    def run_unit(self, unit: str, inputs: tuple):
        index = self.unit_index[unit]
        if torch.is_grad_enabled():
            return UnitFunction.apply(self, index, self._anchor, *inputs)
        return self.forward_unit(index, inputs)

    # ------------------------------------------------------------------ unit execution
    def _params(self, index: int) -> list[torch.Tensor]:
        views = self.store.unit_views(index, self._slot_of[index])
        return [views[name] for name in self.calls[index].params]

    def _buffers(self, index: int) -> list[torch.Tensor]:
        return [self.buffers[name] for name in self.calls[index].buffers]

    def _saved_mode(self, index: int) -> bool:
        acts = self.plan.activations
        return acts is not None and acts.of(index).mode == "saved"

    def _trainable(self, index: int) -> set[str]:
        return {name for g in self.plan.groups if g.trainable and index in g.users for name in g.params}

    def forward_unit(self, index: int, inputs: tuple):
        self._set_step(self.fwd_step[index])
        self.schedule.run_until(self._step, Stage.BEFORE)
        if self.pending_backward and self._saved_mode(index):
            cost = self.plan.costs.units[index]
            with self._span("compute", f"fwd {self.calls[index].name}"):
                return self.saved.run_forward(index, self.calls[index], self.modules[index],
                                              self.plan.activations.of(index), cost.packs, inputs,
                                              self._params(index), self._trainable(index), self._buffers(index))
        if self.plan.units[index].has_random_ops:
            self._rng[index] = _RngState(
                torch.get_rng_state(),
                torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None)
        with self._span("compute", f"fwd {self.calls[index].name}"):
            return tuple(self.modules[index](*inputs, *self._params(index), *self._buffers(index)))

    def backward_unit(self, index: int, grad_outputs: tuple) -> list[torch.Tensor | None]:
        step = self.bwd_step[index]
        self._set_step(step)
        self.schedule.run_until(step, Stage.DURING)
        call = self.calls[index]
        if index in self._ready:
            self.wait_params(index)
        if index in self.saved.runs:
            return self._backward_saved(index, step, grad_outputs)
        inputs = [self.activations.get(name) for name in call.inputs]
        leaves = [x.detach().requires_grad_(x.is_floating_point()) if isinstance(x, torch.Tensor) else x
                  for x in inputs]
        params = self._params(index)
        trainable = self._trainable(index)
        param_leaves = []
        grad_views = self._grad_views(index)
        for name, p in zip(call.params, params):
            leaf = p.detach()
            if name in trainable:
                leaf.requires_grad_(True)
                leaf.grad = grad_views[name]
            param_leaves.append(leaf)
        with self._span("compute", f"bwd {call.name}"):
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [],
                                       enabled=index in self._rng):
                if index in self._rng:
                    state = self._rng[index]
                    torch.set_rng_state(state.cpu)
                    if state.device is not None:
                        torch.cuda.set_rng_state(state.device, self.device)
                with torch.enable_grad():
                    outputs = self.modules[index](*leaves, *param_leaves, *self._buffers(index))
            pairs = [(o, g) for o, g in zip(outputs, grad_outputs)
                     if g is not None and isinstance(o, torch.Tensor) and o.requires_grad]
            wrt = [x for x in leaves if isinstance(x, torch.Tensor) and x.requires_grad]
            wrt += [p for p in param_leaves if p.requires_grad]
            if pairs and wrt:
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs], inputs=wrt)
        input_grads = [x.grad if isinstance(x, torch.Tensor) and x.requires_grad else None for x in leaves]
        del outputs, pairs, param_leaves, wrt
        self.schedule.run_until(step, Stage.AFTER)     # gradients out, updates, releases
        if index == 0:
            self.pending_backward = False
        return input_grads

    def _backward_saved(self, index: int, step: int, grad_outputs: tuple) -> list[torch.Tensor | None]:
        """Backward of a unit whose forward kept its saved values: no recompute of the unit, only of the values
        the plan chose to recompute (inside the unpack hooks)."""
        call = self.calls[index]
        views = self.store.unit_views(index, self._slot_of[index])
        inputs = {name: self.activations.get(name) for name in call.inputs}
        buffers = {name: self.buffers[name] for name in call.buffers}
        run = self.saved.prepare_backward(index, views, inputs, buffers)
        pairs = [(o, g) for o, g in zip(run.outputs, grad_outputs)
                 if g is not None and isinstance(o, torch.Tensor) and o.requires_grad]
        input_wrt = [x for x in run.input_leaves if isinstance(x, torch.Tensor) and x.requires_grad]
        grad_views = self._grad_views(index)
        param_wrt = []
        for name, p in zip(call.params, run.param_leaves):
            if p.requires_grad:
                p.grad = grad_views[name]      # autograd accumulates in place, as in the recompute path
                param_wrt.append(p)
        with self._span("compute", f"bwd {call.name}"):
            if pairs and (input_wrt or param_wrt):
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs], inputs=input_wrt + param_wrt)
        input_grads = [x.grad if isinstance(x, torch.Tensor) and x.requires_grad else None for x in run.input_leaves]
        del pairs, run
        self.saved.release(index)
        self.schedule.run_until(step, Stage.AFTER)
        if index == 0:
            self.pending_backward = False
        return input_grads

    def _grad_views(self, index: int) -> dict[str, torch.Tensor]:
        views = {}
        for g in self.plan.groups:
            if not g.trainable or index not in g.users:
                continue
            flat = self._grad_buffers.get(g.index)
            if flat is None:
                # A gradient reduce-scattered among the ranks is N equal slices, the last padded.
                scattered = self.store.scattered(g)
                numel = self.store.landing_numel(g) * self.store.ranks.world if scattered else g.numel
                flat = torch.zeros(numel, dtype=g.dtype, device=self.device)
                self._grad_buffers[g.index] = flat
            views.update(zip(g.params, g.views(flat)))
        return views

    def _flush_grads(self, index: int) -> None:
        """Copy every group whose gradient is now complete to the host. Updates that wait for the whole
        gradient (clipping) need each group's norms and sums now; the others go at their ``optimizer_step``."""
        after = self.lanes.event()
        ranks = self.store.ranks
        for g in self.plan.groups:
            if g.trainable and g.update_unit == index and not self.store.on_gpu(g):
                flat = self._grad_buffers.pop(g.index)
                norms = None
                ready = after
                if self.optimizer is not None and self.optimizer.norms_on_device:
                    # clip_grad_norm_'s per-parameter norms, where the gradient is (free on a GPU)
                    norms = torch._foreach_norm(g.views(flat), 2.0)
                if ranks is not None:
                    # Averaged among the GPUs, each rank keeping its slice: 1/N of the bytes leave for the host.
                    # The D2H stream waits for the collective (and then copies); the next backward does not.
                    flat = ranks.reduce_scatter_(torch.empty(flat.numel() // ranks.world, dtype=g.dtype,
                                                             device=self.device), flat,
                                                 stream=self.lanes.d2h if self.lanes.cuda else None)
                    # (on CPU ranks the collective is done when it returns: the copy follows compute so far)
                    ready = None if self.lanes.cuda else self.lanes.event()
                copied = self.lanes.copy(self.store.grad_landing(g), flat, self.lanes.d2h, after=ready,
                                         span=(self.recorder, "d2h", f"grads {g.name}", self._step))
                if self.optimizer is not None and self.optimizer.deferred:
                    self.optimizer.submit(g, copied, self.recorder, self._step, norms)
                else:
                    self._flushed[g.index] = (copied, norms)

    def _optimizer_step(self, t) -> None:
        if self.optimizer is None:
            return
        group = self.plan.groups[t.group]
        if self.optimizer.deferred:
            self.optimizer.request_update(group)
        else:
            copied, norms = self._flushed.pop(group.index)
            self.optimizer.submit(group, copied, self.recorder, self._step, norms)

    def _gpu_step(self, t) -> None:
        """A group resident on the GPU: its gradient stays there, for the optimizer's update on the GPU."""
        flat = self._grad_buffers.pop(t.group)
        if self.optimizer is not None:
            self.optimizer.gpu_step(self.plan.groups[t.group], flat, self.recorder, self._step)

    def _drop_unsubmitted(self) -> None:
        """Gradients copied out but never handed to the optimizer (a step that failed half way) give their
        staging slots back."""
        for index in list(self._flushed):
            self.store.grad_consumed(self.plan.groups[index])
            del self._flushed[index]

    def finish_step(self) -> None:
        """After backward (or an inference forward): nothing of this step stays on the device."""
        for index in list(self._slot_of):
            self._release_params(index)
        self._ready.clear()
        self._grad_buffers.clear()
        self._drop_unsubmitted()
        self.activations.clear()
        self.saved.clear()
        self._rng.clear()
