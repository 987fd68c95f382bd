"""The CPU optimizer: AdamW per parameter group, run on a worker thread while backward goes on.

When a group's gradient is complete (after the backward of its lowest user unit) the runtime copies it to
pinned host memory and submits the group here with the copy's event. The worker waits for that copy and,
depending on where the step is in its update cycle:

  accumulating   (``accumulate=k``, micro-batches 1..k-1) adds the gradient into the group's fp32
                 accumulation buffer (the first micro-batch copies), exactly as ``p.grad`` accumulates;
  updating       (the k-th micro-batch) updates the fp32 master and Adam states with the arithmetic of
                 ``torch.optim.AdamW`` and writes the compute copy the next forward streams to the GPU;
  clipping       (``max_grad_norm``) the update needs the global norm, known only once every gradient has
                 landed: the worker computes each parameter's norm as its group lands, and when the engine
                 calls ``finalize`` (backward done) it forms the total norm exactly as
                 ``torch.nn.utils.clip_grad_norm_`` does, then updates every group in forward order with the
                 gradient scaled by the clip coefficient. A non-finite norm skips the step: no state changes.

While a group with states on SSD waits for a piece still being read, the worker updates groups that live
wholly in host memory and would otherwise wait behind it: gradients queued behind it (landed, updated at once),
or, in an update pass at the end of the cycle (clipping), the host groups, which that pass puts last. Their
updates are independent of the SSD group's; with several ranks the order stays as planned (each update
exchanges with the other ranks). An SSD-bound step otherwise ended with those updates, and the backward they
held up in the gradient ring, after the disk had finished (a profiled CPU step: 13 % of it).

``wait(group)`` blocks until a group's work is done: the next forward never reads a stale weight.
With several ranks (``ratel.runtime.ranks``), what lands is this rank's slice of the ranks' mean gradient,
reduce-scattered on the GPUs by the runtime (that collective is also what keeps any rank from writing a weight
another still reads in this backward: every rank's backward of the group is done when it completes); the
worker sums slices over micro-batches, forms clipping norms from each parameter's squares summed over the
ranks, and updates this rank's slice, writing the new weights into the compute copy the host's ranks share
(or, for compute copies on SSD, gathering the other slices); ``finish_cycle`` ends with a barrier. A group
resident on the GPU is whole on every rank: its gradient is averaged there and every rank updates it alike.
Hyper-parameters (lr, betas, eps, weight decay) come per parameter *segment*: a flat group may hold
parameters of several user param groups (no weight decay on norms and biases), each updated with its own.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import sys
import threading
import time
import warnings
from dataclasses import dataclass

import torch

from ratel.errors import RatelError
from ratel.ir import ParamGroup, TransferKind as K
from ratel.runtime import checked_lanes
from ratel.runtime.cpu_adam import accumulate_, adamw_step, fused_adamw_step

log = logging.getLogger("ratel.runtime")


@dataclass
class AdamW:
    """AdamW hyper-parameters, as ``torch.optim.AdamW`` takes them (decoupled weight decay)."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2

    def __post_init__(self):
        if not self.lr >= 0:
            raise ValueError(f"AdamW(lr={self.lr}): the learning rate must be >= 0")
        if not (0 <= self.betas[0] < 1 and 0 <= self.betas[1] < 1):
            raise ValueError(f"AdamW(betas={self.betas}): each beta must be in [0, 1)")
        if not self.eps >= 0:
            raise ValueError(f"AdamW(eps={self.eps}): eps must be >= 0")


@dataclass(frozen=True)
class Hyper:
    """The hyper-parameters one update of one segment runs with (a snapshot of a user param group)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float

    @staticmethod
    def of(group: dict) -> "Hyper":
        """From a torch param group (or its defaults)."""
        beta1, beta2 = group["betas"]
        return Hyper(float(group["lr"]), float(beta1), float(beta2), float(group["eps"]),
                     float(group["weight_decay"]))

    @staticmethod
    def of_config(cfg: "AdamW | Hyper") -> "Hyper":
        if isinstance(cfg, Hyper):
            return cfg
        return Hyper(float(cfg.lr), float(cfg.betas[0]), float(cfg.betas[1]), float(cfg.eps), float(cfg.weight_decay))


def adamw_update(master: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 step: torch.Tensor, cfg: AdamW | Hyper, out: torch.Tensor | None = None,
                 num_threads: int | None = None, grad_scale: float = 1.0) -> str:
    """One AdamW step on flat fp32 buffers (``step`` already incremented); ``out`` gets the rounded copy.

    Runs the native one-pass kernel where it was measured faster than torch's fused CPU AdamW, else torch's
    (``ratel.runtime.cpu_adam``); both give the same bits as ``torch.optim.AdamW(fused=True)``.
    """
    hyper = Hyper.of_config(cfg)
    return adamw_step(master, grad, exp_avg, exp_avg_sq, int(step.item()), lr=hyper.lr, beta1=hyper.beta1,
                      beta2=hyper.beta2, eps=hyper.eps, weight_decay=hyper.weight_decay, out=out,
                      num_threads=num_threads, grad_scale=grad_scale)


def _caller_outside_libraries() -> int:
    """The ``stacklevel`` of the first caller outside ratel and torch (the user's ``step()`` line)."""
    libraries = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(torch.__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(libraries):
        frame, level = frame.f_back, level + 1
    return level


class CPUOptimizer:
    """A worker thread applying AdamW to groups as their gradients land in host memory.

    segments   group index -> ((start, end, hyper index), ...) element ranges of the flat group and the user
               param group each belongs to; default: the whole group, hyper-parameters ``cfg``
    norm_order (group index, element offset, shape) of every trainable parameter in the order of
               ``model.parameters()``, the order ``clip_grad_norm_`` stacks per-parameter norms in
    """

    def __init__(self, store, cfg: AdamW | Hyper, ssd=None, *, segments: dict | None = None, accumulate: int = 1,
                 max_grad_norm: float | None = None, norm_order: tuple = (), ranks=None, threads: int | None = None):
        self.store = store
        self.ranks = ranks             # several data-parallel ranks, or None
        self.ssd = ssd
        self.cfg = cfg
        self.accumulate = int(accumulate)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        trainable = [g for g in store.groups if g.trainable]
        self.segments = segments or {g.index: ((0, g.numel, 0),) for g in trainable}
        self.hypers: list[Hyper] = [Hyper.of_config(cfg)]
        self.norm_order = tuple(norm_order) or tuple((g.index, o, s) for g in trainable
                                                     for o, s in zip(g.offsets, g.shapes))
        # fp32 gradient sums across micro-batches (planned as "gradient accumulation" host memory)
        # (for a group resident on the GPU, on the GPU; with ranks, of the slice of the gradient this rank receives)
        self.acc = {g.index: torch.empty(store.landing_numel(g), dtype=torch.float32,
                                         device=store.device if store.on_gpu(g) else "cpu")
                    for g in trainable} if self.accumulate > 1 else {}
        self.forward_order = sorted(trainable, key=lambda g: (g.update_unit, g.index))
        self.micro = 0                 # micro-batches whose backward ran in this update cycle
        self.grad_norm: float | None = None
        self.skipped_steps = 0
        self._cycle_open = False
        self._final = self.accumulate == 1
        self._recorder = None
        self._skip_warning: str | None = None
        self._norms: dict[int, list[torch.Tensor]] = {}
        self._requested: list[ParamGroup] = []
        self.schedule = None           # the executor of the running program: dynamic transfers are reported to it
        self._queue: queue.Queue = queue.Queue()
        self._meanwhile_seconds = 0.0   # spent on updates run while an SSD group waited (not that group's time)
        self._ahead: list[ParamGroup] = []      # an end-of-cycle pass's host groups not updated yet, and
        self._update_ahead = None               # how it updates one (_update_all)
        self._done = {g.index: threading.Event() for g in store.groups}
        for event in self._done.values():
            event.set()
        self._error: BaseException | None = None      # the worker's failure, until the training thread raises it
        self._failure: BaseException | None = None    # its first failure: from then on the engine cannot train
        # OpenMP thread counts are per calling thread: take the training thread's, not the worker's default.
        self.threads = threads or torch.get_num_threads()
        self._checked = checked_lanes.joining()   # (checked lanes: its updates on the "GPU" are compute too)
        self._thread = threading.Thread(target=self._work, name="ratel-cpu-adamw", daemon=True)
        self._thread.start()

    @property
    def deferred(self) -> bool:
        """Updates wait for the whole gradient (clipping needs its global norm)."""
        return self.max_grad_norm is not None

    # ------------------------------------------------------------------ the training thread's calls
    def begin_step(self) -> None:
        """A forward with autograd starts: at the start of an update cycle, read the SSD-resident states of
        the first groups to be updated while the forward runs."""
        if self._cycle_open:
            return
        self._cycle_open = True
        if self.ssd is not None:
            self._queue.put(("begin",))

    def begin_backward(self, hypers: list[Hyper] | None = None) -> bool:
        """A backward starts; returns whether it completes the update cycle (the k-th micro-batch). The
        update of this cycle runs with ``hypers`` (one per user param group), read now."""
        if self.micro >= self.accumulate:
            raise RatelError(self._too_many_backwards())
        if hypers is not None:
            self.hypers = list(hypers)
        self._final = self.micro + 1 == self.accumulate
        return self._final

    def end_backward(self) -> None:
        """The backward returned: every group of it was submitted."""
        self.micro += 1

    def _too_many_backwards(self) -> str:
        if self.accumulate == 1:
            return ("backward() was called twice without engine.step() in between: Ratel applies the update "
                    "during backward. To accumulate gradients over micro-batches, compile with accumulate=k and "
                    "call engine.step() after every k backward() calls")
        return (f"backward() was called {self.micro + 1} times since the last engine.step(), but the engine was "
                f"compiled with accumulate={self.accumulate}: call engine.step() after every {self.accumulate} "
                "micro-batches")

    @property
    def norms_on_device(self) -> bool:
        """Whether the runtime computes per-parameter norms where the gradient is made (clipping without
        accumulation: the device holds the whole gradient of each parameter, and the norms cost nothing there)."""
        return self.deferred and self.accumulate == 1 and self.ranks is None

    def submit(self, group: ParamGroup, copied, recorder=None, step: int = -1, norms=None) -> None:
        """Take ``group``'s gradient once the event ``copied`` (its D2H copy) has completed; ``norms``: its
        parameters' gradient norms, computed on the device (see ``norms_on_device``)."""
        self._raise_pending()
        self._done[group.index].clear()
        self._queue.put(("grad", group, copied, recorder, step, self.micro, self._final, norms))

    def gpu_step(self, group: ParamGroup, grad: torch.Tensor, recorder=None, step: int = -1) -> None:
        """The plan's ``gpu_step`` for a group resident on the GPU, on the training thread, whose stream orders
        it after the backward that made ``grad``: sum it into the cycle's fp32 gradient, and on the cycle's
        last micro-batch update the group there at once — or, when the update needs the global norm, hand
        the gradient's norms to the worker, which updates the group with the others once the norm is known."""
        self._raise_pending()
        i = group.index
        if self.accumulate > 1:
            acc = self.acc[i]
            acc.copy_(grad) if self.micro == 0 else acc.add_(grad)   # the bits of p.grad accumulating in fp32
            grad = acc
        if not self._final:
            return
        self.store.device_grads[i] = grad
        if self.ranks is not None and not self.deferred:
            self.ranks.average_(grad, device=True)     # on the GPUs, in the plan's order on every rank
        if self.deferred:
            norms = torch._foreach_norm(group.views(grad), 2.0) if self.norms_on_device else None
            self.submit(group, None, recorder, step, norms)
            self.request_update(group)
            return
        # Timed on the compute stream, as the plan prices it (a profiled step's "compute" lane).
        timed = (recorder.span("compute", f"adamw {group.name}", step, nbytes=group.numel * 4)
                 if recorder is not None else contextlib.nullcontext())
        with timed:
            self._update(group, grad, 1.0)

    def request_update(self, group: ParamGroup) -> None:
        """The plan's ``optimizer_step`` of a deferred update: once every group is requested (after the last
        gradient), the worker forms the norm and updates the groups in this order."""
        if not self._final:
            return                       # a micro-batch before the k-th: its gradient was summed, no update
        self._requested.append(group)
        if len(self._requested) == len(self.forward_order):
            self._queue.put(("finalize", tuple(self._requested)))
            self._requested = []

    def finish_cycle(self) -> None:
        """``engine.step()``: make sure this cycle's update is applied, even after fewer than k micro-batches
        (the last, partial accumulation of an epoch), then wait for it."""
        if self.ranks is not None:
            self.wait_all()     # the worker's collectives are over: this thread's cannot interleave with them
            self.ranks.same_everywhere(self.micro, "the number of backward() calls before step()",
                                       "every rank runs the same number of micro-batches per update")
        if 0 < self.micro < self.accumulate:
            for g in self.forward_order:
                self._done[g.index].clear()
            self._queue.put(("partial",))
        self.wait_all()
        self.store.host_copies_current()    # the model object's copies of groups resident on the GPU
        if self.ranks is not None and self.store.shared_compute:
            self.ranks.barrier()    # every rank has written its slices of the shared weights: the next forward reads them
        self.micro = 0
        self._cycle_open = False
        if self._skip_warning is not None:     # warned here, on the training thread, where the user's step() is
            message, self._skip_warning = self._skip_warning, None
            warnings.warn(message, RuntimeWarning, stacklevel=_caller_outside_libraries())

    def wait(self, group_index: int) -> None:
        self._done[group_index].wait()
        self._raise_pending()

    def wait_all(self) -> None:
        for event in self._done.values():
            event.wait()
        self._raise_pending()

    def close(self) -> None:
        """Stop the worker once it has done what is queued, and raise a failure of it not raised yet. Not
        ``wait_all``: an update cycle a failed backward left open (clipping waits for every group) never
        completes, and waiting for it hung ``close()`` (and so the exit of a script interrupted mid-backward,
        which closes the engines it left open)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:      # a failure not raised yet (one raised before is not raised again)
            self._raise_pending()

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"the CPU optimizer failed ({type(error).__name__}): {error}") from error
        if self._failure is not None:
            raise RatelError(f"the CPU optimizer failed earlier ({type(self._failure).__name__}: {self._failure}): "
                             "some parameter groups were updated and others not, so this engine cannot go on; "
                             "close it and resume from the last checkpoint (ratel.compile(..., resume=...))"
                             ) from self._failure

    # ------------------------------------------------------------------ the worker
    def _work(self) -> None:
        torch.set_num_threads(self.threads)
        with self._checked:
            self._serve()

    def _serve(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                if item[0] == "begin":
                    self.ssd.begin_step()
                elif item[0] == "grad":
                    self._take_grad(*item[1:])
                elif item[0] == "finalize":
                    self._clip_and_update(list(item[1]))
                elif item[0] == "partial":
                    if self.ranks is not None:     # (the sums of streamed groups' slices are means already)
                        for g in self.forward_order:
                            if self.store.on_gpu(g):
                                self.ranks.average_(self.acc[g.index], device=True)
                    if self.deferred:
                        for g in self.forward_order:
                            self._norms[g.index] = self._param_norms(g, self.acc[g.index])
                        self._clip_and_update(self.forward_order)
                    else:
                        self._update_all(self.forward_order, 1.0)
            except BaseException as exc:  # noqa: BLE001 - surfaced on the training thread
                if self._failure is None:     # later ones follow from it (an update cycle left half done)
                    self._failure = self._error = exc
                for event in self._done.values():
                    event.set()

    def _take_grad(self, group: ParamGroup, copied, recorder, step: int, micro: int, final: bool,
                   norms=None) -> None:
        try:
            if copied is not None:
                copied.synchronize()
            start = time.perf_counter()
            meanwhile = self._meanwhile_seconds
            grad = self.store.grad_of(group)
            if self.accumulate > 1 and self.store.on_gpu(group):
                grad = self.acc[group.index]       # summed on the GPU by gpu_step
            elif self.accumulate > 1:
                acc = self.acc[group.index]
                # PyTorch's first backward sets p.grad; later ones add to it
                accumulate_(acc, grad, copy=micro == 0, num_threads=self.threads)
                self.store.grad_consumed(group)
                grad = acc
            if final and self.ranks is not None and self.store.on_gpu(group):
                begin = time.perf_counter()
                self.ranks.average_(grad, device=True)     # once per cycle, on the cycle's sum
                if recorder is not None:
                    recorder.cpu_span("comm", f"exchange {group.name}", step, begin, time.perf_counter(),
                                      grad.numel() * grad.element_size())
            if final and self.deferred:
                self._norms[group.index] = norms if norms is not None else self._param_norms(group, grad)
                self._recorder = (recorder, step)
                return                   # updated in _clip_and_update; stays "not done" until then
            if final:
                self._update(group, grad, 1.0)
            self.store.grad_consumed(group)
            if recorder is not None:
                label = "adamw" if final else "accumulate"
                # As long as its own work: the updates run while it waited have spans of their own.
                end = time.perf_counter() - (self._meanwhile_seconds - meanwhile)
                recorder.cpu_span("optimizer", f"{label} {group.name}", step, start, max(end, start), group.numel * 4)
            self._done[group.index].set()
        except BaseException:
            self.store.grad_consumed(group)
            self._done[group.index].set()
            raise

    def _param_norms(self, group: ParamGroup, grad: torch.Tensor) -> list[torch.Tensor]:
        """Each parameter's gradient norm, as clip_grad_norm_ takes it; from this rank's slice with ranks: the
        squares of each parameter's part in it, summed over the ranks."""
        if not self.store.scattered(group):
            return [torch.linalg.vector_norm(view, 2.0) for view in group.views(grad)]
        start, end = self.ranks.shard(group.numel)
        squares = torch.zeros(len(group.params), dtype=torch.float64)
        for k, (offset, shape) in enumerate(zip(group.offsets, group.shapes)):
            first, last = max(offset, start), min(offset + math.prod(shape), end)
            if first < last:
                squares[k] = grad[first - start:last - start].double().square().sum()
        self.ranks.sum_(squares)
        return list(squares.sqrt().float())

    def _clip_and_update(self, groups: list[ParamGroup]) -> None:
        """The total norm as ``clip_grad_norm_`` forms it, then every update with the clipped gradient."""
        position = {}
        for g in groups:
            for k, offset in enumerate(g.offsets):
                position[(g.index, offset)] = self._norms[g.index][k]
        norms = [position[(i, offset)] for i, offset, _ in self.norm_order]
        if len({n.device for n in norms}) > 1:     # groups resident on the GPU among groups updated here
            norms = [n.cpu() for n in norms]
        # As clip_grad_norm_: the norm of the per-parameter norms, on the device they were computed on.
        total = torch.linalg.vector_norm(torch.stack(norms), 2.0) if norms else torch.zeros(())
        self._norms.clear()
        self.grad_norm = float(total)
        if math.isfinite(self.grad_norm):
            self._update_all(groups, float(torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0)))
            return
        self.skipped_steps += 1
        self._skip_warning = (f"ratel: the gradient norm is {self.grad_norm}: this step is skipped, "
                              "parameters and optimizer states are unchanged")
        self.store.device_grads.clear()
        try:
            if self.ssd is not None:
                self.ssd.abandon_step()
        finally:
            for g in groups:
                self._done[g.index].set()

    def _update_all(self, groups: list[ParamGroup], grad_scale: float) -> None:
        """The updates that wait for the end of the cycle, in this order, but for groups in host memory (one
        rank): they go last, or while an SSD group waits for its states (module docstring); each group is
        released to the next forward as soon as it is done (all of them, whatever happens)."""
        recorder, step = self._recorder or (None, -1)
        updated: set[int] = set()

        def update(g: ParamGroup) -> None:
            updated.add(g.index)
            if g in self._ahead:
                self._ahead.remove(g)
            start, meanwhile = time.perf_counter(), self._meanwhile_seconds
            self._update(g, self.acc[g.index] if self.accumulate > 1 else self.store.grad_of(g), grad_scale)
            if recorder is not None:
                end = time.perf_counter() - (self._meanwhile_seconds - meanwhile)
                recorder.cpu_span("optimizer", f"adamw {g.name}", step, start, max(end, start), g.numel * 4)
            self._done[g.index].set()

        self._ahead = [g for g in groups if self._in_host_memory(g)] if self.ranks is None else []
        if self._ahead and any(self.store.on_ssd(g) for g in groups):
            # The other groups first, in their order (the SSD reads follow it): the disk starts at once, and
            # the host groups fill its waits instead of running before it.
            groups = [g for g in groups if g not in self._ahead] + self._ahead
        self._update_ahead = update
        try:
            for g in groups:
                if g.index not in updated:
                    update(g)
        finally:
            self._ahead, self._update_ahead = [], None
            for g in groups:
                self._done[g.index].set()

    def _update(self, group: ParamGroup, grad: torch.Tensor, grad_scale: float) -> None:
        s = self.store
        i = group.index
        if s.on_gpu(group):
            self._update_on_gpu(group, grad, grad_scale)
            return
        out = s.compute.get(i) if group.dtype != torch.float32 else None
        slot = None
        if s.params_on_ssd(group):
            slot, out = s.ssd_params.write_buffer(group)
        s.steps[i] += 1
        mine = self.ranks.shard(group.numel) if self.ranks is not None else (0, group.numel)
        base = mine[0] if s.scattered(group) else 0      # the element ``grad`` starts at: its slice's
        for first, last, (master, exp_avg, exp_avg_sq) in self._states(group):
            # The state span's elements, cut by the hyper-parameter segments they cross (and this rank's slice).
            for start, end, h in self.segments[i]:
                start, end = max(start, first, mine[0]), min(end, last, mine[1])
                if start < end:
                    a, b = start - first, end - first
                    adamw_update(master[a:b], grad[start - base:end - base], exp_avg[a:b], exp_avg_sq[a:b], s.steps[i],
                                 self.hypers[h], out=None if out is None else out[start:end],
                                 num_threads=self.threads, grad_scale=grad_scale)
        if self.ranks is not None and (slot is not None or not s.shared_compute):
            self.ranks.gather_(out if out is not None else s.master[i])    # the next forward's weights
        if s.on_ssd(group):
            self._report(K.SSD_WRITE_STATES, group)
        if slot is not None:
            s.ssd_params.commit_write(group, slot)
            self._report(K.SSD_WRITE_PARAMS, group)

    def _update_on_gpu(self, group: ParamGroup, grad: torch.Tensor, grad_scale: float) -> None:
        """AdamW on a group resident on the GPU: torch's fused kernel there (the arithmetic of the CPU path:
        ``torch.optim.AdamW(fused=True)``), per hyper-parameter segment, on the compute stream (this may be
        the worker's thread), then its new weights to the model's host copy."""
        s, i = self.store, group.index
        lanes = s.lanes
        stream = torch.cuda.stream(lanes.compute) if lanes is not None and lanes.cuda else contextlib.nullcontext()
        with stream:
            s.before_update(group)
            s.steps[i] += 1
            step = int(s.steps[i].item())
            out = s.device_compute[i] if group.dtype != torch.float32 else None
            master, exp_avg, exp_avg_sq = s.master[i], s.exp_avg[i], s.exp_avg_sq[i]
            for start, end, h in self.segments[i]:
                hyper = self.hypers[h]
                fused_adamw_step(master[start:end], grad[start:end], exp_avg[start:end], exp_avg_sq[start:end],
                                 step, lr=hyper.lr, beta1=hyper.beta1, beta2=hyper.beta2, eps=hyper.eps,
                                 weight_decay=hyper.weight_decay, out=None if out is None else out[start:end],
                                 grad_scale=grad_scale)
            s.device_grads.pop(i, None)
            s.write_back(group)
        self._report(K.WRITE_BACK_PARAMS, group)

    def _states(self, group: ParamGroup):
        """(first element, end element, (master, exp_avg, exp_avg_sq)) spans of the group's states: the whole
        group when they live in host memory; on SSD, piece by piece as they stream through the staging ring,
        each piece written back once the caller moves on to the next."""
        s, i = self.store, group.index
        if not s.on_ssd(group):
            yield *s.state_range(group), s.host_states(group)
            return
        for piece, (first, last) in enumerate(self.ssd.piece_ranges(group)):
            self._update_others_while_reading(group, piece)
            master, exp_avg, exp_avg_sq = self.ssd.acquire(group, piece)
            if master is None:   # an fp32 group: its master is its compute copy, in host memory
                master = s.master[i][first:last]
            yield first, last, (master, exp_avg, exp_avg_sq)
            self.ssd.release(group, piece)

    def _in_host_memory(self, group: ParamGroup) -> bool:
        """States, compute copy and update on the host: an update no other group's SSD traffic or stream waits on."""
        s = self.store
        return not s.on_ssd(group) and not s.params_on_ssd(group) and not s.on_gpu(group)

    def _update_others_while_reading(self, group: ParamGroup, piece: int) -> None:
        """Until the piece's states are read, update groups in host memory that may go first (module docstring):
        those later in the same end-of-cycle pass, or gradients queued behind this one."""
        while not self.ssd.ready(group, piece):
            start = time.perf_counter()
            try:
                if self._ahead:
                    self._update_ahead(self._ahead[0])
                elif (item := self._take_queued_host_update()) is not None:
                    self._take_grad(*item[1:])
                else:
                    return
            finally:
                self._meanwhile_seconds += time.perf_counter() - start

    def _take_queued_host_update(self):
        """The first queued gradient of a group in host memory that has landed and updates at once, removed
        from the queue; None if there is none before the next item that is not a gradient (a new step, the
        end of the cycle, close)."""
        if self.deferred or self.ranks is not None:
            return None
        with self._queue.mutex:
            pending = self._queue.queue
            for i, item in enumerate(pending):
                if item is None or item[0] != "grad":
                    return None
                group, copied, final = item[1], item[2], item[6]
                if final and self._in_host_memory(group) and (copied is None or copied.query()):
                    del pending[i]
                    return item
        return None

    def _report(self, kind, group: ParamGroup) -> None:
        if self.schedule is not None:
            self.schedule.report(kind, group=group.index)
