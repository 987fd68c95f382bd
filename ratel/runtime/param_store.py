"""ParamStore: every parameter's host copies in flat per-group buffers, and the GPU ring they stream into.

Per ``ParamGroup`` (parameters of one dtype read by the same units):
  master        fp32, the value AdamW updates (for fp32 models it is also the compute copy);
  exp_avg/sq    fp32 Adam states;
  compute       the group's dtype, pinned: the source of every host-to-GPU copy;
  grad staging  the group's dtype, pinned: the destination of the gradient's GPU-to-host copy.
The GPU ring is ``depth`` slots of ``slot_bytes``; a unit's parameters are views into the slot holding it,
laid out by the plan's ``SlotLayout``.

Values come from the model's own tensors, from local safetensors files, or, for a model created on the meta
device, from the model's initialiser run one module at a time on a throwaway copy, so the whole model never
exists anywhere but in these buffers.
"""
from __future__ import annotations

import contextlib
import copy
import math
import logging
import os
import threading
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ratel.errors import RatelError
from ratel.ir import ParamGroup, Plan, canonical_parameter_names
from ratel.ir.layout import grad_ring_slots, grad_staging_sizes, landing_numel
from ratel.runtime.memory import PinnedPool
from ratel.runtime.tensor_files import TensorSet

log = logging.getLogger("ratel.runtime")


class GradientRing:
    """Pinned slots gradients stream through: the flush takes one per group, the optimizer gives it back."""

    def __init__(self, buffers: list[torch.Tensor]):
        self.free = list(buffers)
        self.holding: dict[int, torch.Tensor] = {}
        self._cond = threading.Condition()

    def take(self, group: ParamGroup, nbytes: int) -> torch.Tensor:
        with self._cond:
            self._cond.wait_for(lambda: self.free)
            slot = self.free.pop(0)
            self.holding[group.index] = slot
        return slot[:nbytes].view(group.dtype)

    def held(self, group: ParamGroup, nbytes: int) -> torch.Tensor:
        return self.holding[group.index][:nbytes].view(group.dtype)

    def give_back(self, group: ParamGroup) -> None:
        with self._cond:
            slot = self.holding.pop(group.index, None)
            if slot is not None:
                self.free.append(slot)
                self._cond.notify()


class ParamStore:
    def __init__(self, plan: Plan, device: torch.device, pool: PinnedPool, ssd=None, ssd_params=None,
                 accumulate: int = 1, clip: bool = False, ranks=None, compute_pool=None, lanes=None):
        self.plan = plan
        # Several data-parallel ranks: each updates its slice of every group. It keeps host-resident masters
        # and moments for that slice only; SSD-resident ones whole, current only in its slice until gathered.
        self.ranks = ranks
        # With ranks, the compute copies in host memory are one copy the ranks of this host share: each writes
        # its slice of every update there (and the engine waits for all before the next forward).
        self.shared_compute = compute_pool is not None
        self.ssd = ssd                  # SsdStates holding the optimizer states of groups placed on SSD
        self.ssd_params = ssd_params    # SsdParams holding the compute copies of groups placed on SSD
        self.groups = plan.groups
        self.device = device
        self.master: dict[int, torch.Tensor] = {}
        self.exp_avg: dict[int, torch.Tensor] = {}
        self.exp_avg_sq: dict[int, torch.Tensor] = {}
        self.compute: dict[int, torch.Tensor] = {}
        self.grad_staging: dict[int, torch.Tensor] = {}
        self.steps: dict[int, torch.Tensor] = {}
        # Groups resident on the GPU (plan_resident_groups): their compute copy, master and moments live there;
        # ``compute`` keeps a host copy the model object aliases, written back after each update.
        # (with ranks, whole on every rank: their gradients are averaged on the GPUs, each rank applies the update)
        self.resident = {g.index for g in self.groups if plan.placement.on_gpu(g.name)}
        self.device_compute: dict[int, torch.Tensor] = {}
        self.device_grads: dict[int, torch.Tensor] = {}    # gradients of resident groups awaiting their update
        self.written_back: dict[int, object] = {}          # group -> event of its last copy to the host
        self.lanes = lanes                                  # the engine's Lanes, for the write-backs
        for g in self.groups:
            if not self.params_on_ssd(g):
                self.compute[g.index] = (compute_pool or pool).take(g.nbytes, g.dtype)
            if g.index in self.resident:
                self.device_compute[g.index] = torch.empty(g.numel, dtype=g.dtype, device=device)
                if g.trainable:
                    self.master[g.index] = (self.device_compute[g.index] if g.dtype == torch.float32 else
                                            torch.empty(g.numel, dtype=torch.float32, device=device))
                    self.exp_avg[g.index] = torch.zeros(g.numel, dtype=torch.float32, device=device)
                    self.exp_avg_sq[g.index] = torch.zeros(g.numel, dtype=torch.float32, device=device)
                    self.steps[g.index] = torch.zeros((), dtype=torch.float32)
                continue
            if g.trainable:
                on_ssd = self.on_ssd(g)
                start, end = self.state_range(g)
                if g.dtype == torch.float32:
                    self.master[g.index] = self.compute[g.index]
                elif not on_ssd:
                    self.master[g.index] = torch.empty(end - start, dtype=torch.float32)
                if not on_ssd:
                    self.exp_avg[g.index] = torch.zeros(end - start, dtype=torch.float32)
                    self.exp_avg_sq[g.index] = torch.zeros(end - start, dtype=torch.float32)
                self.steps[g.index] = torch.zeros((), dtype=torch.float32)
        streamed = [g for g in self.groups if g.index not in self.resident]
        # With ranks a gradient is reduce-scattered on the GPUs: only this rank's slice lands here.
        world = ranks.world if ranks is not None else 1
        slots = grad_ring_slots(streamed, accumulate, clip, world)
        if slots is None:
            for g in streamed:
                if g.trainable:
                    self.grad_staging[g.index] = pool.take(self.landing_bytes(g), g.dtype)
            self.grad_ring = None
        else:
            self.grad_ring = GradientRing([pool.take(n) for n in grad_staging_sizes(streamed, accumulate, clip, world)])
        placement = plan.placement
        self.ring = [torch.empty(placement.slot_bytes, dtype=torch.uint8, device=device)
                     for _ in range(placement.depth)]
        # slot -> event of the compute lane's last use of it: a fetch into the slot waits for it. Kept here, not
        # per program: every program streams through this one ring, so a new input shape's first fetch must
        # wait for the kernels of the shape before it (an inference forward's may well still be queued). The
        # first use is the allocation above, on the compute stream, maybe of blocks whose kernels are queued.
        self.slot_free: dict[int, object] = ({slot: lanes.event() for slot in range(len(self.ring))}
                                             if lanes is not None else {})
        self._param_location = {name: (g.index, i) for g in self.groups for i, name in enumerate(g.params)}

    def drop(self) -> None:
        """Let go of every host and device buffer (the engine is closing)."""
        for table in (self.master, self.exp_avg, self.exp_avg_sq, self.compute, self.grad_staging, self.steps,
                      self.device_compute, self.device_grads, self.written_back, self.slot_free):
            table.clear()
        self.grad_ring = None
        self.ring = []

    def grad_landing(self, group: ParamGroup) -> torch.Tensor:
        """Where the group's gradient lands from the GPU: its own buffer, or a ring slot (waits for one: the
        backward does not run further ahead of the CPU optimizer than the ring holds)."""
        if self.grad_ring is None:
            return self.grad_staging[group.index]
        return self.grad_ring.take(group, self.landing_bytes(group))

    def grad_of(self, group: ParamGroup) -> torch.Tensor:
        """The group's gradient as it landed on the host (a group resident on the GPU: there)."""
        if group.index in self.resident:
            return self.device_grads[group.index]
        if self.grad_ring is None:
            return self.grad_staging[group.index]
        return self.grad_ring.held(group, self.landing_bytes(group))

    def grad_consumed(self, group: ParamGroup) -> None:
        """The optimizer has used the group's gradient (summed or applied it): its ring slot is free."""
        if self.grad_ring is not None:
            self.grad_ring.give_back(group)

    def on_gpu(self, group: ParamGroup) -> bool:
        """Whether the group lives on the GPU, updated there (plan_resident_groups)."""
        return group.index in self.resident

    def scattered(self, group: ParamGroup) -> bool:
        """Whether the group's gradient is reduce-scattered among the ranks, this rank's host receiving its slice
        only: with ranks, every group but those resident on the GPU (averaged whole there)."""
        return self.ranks is not None and not self.on_gpu(group)

    def landing_numel(self, group: ParamGroup) -> int:
        """Elements of the group's gradient that reach this process: its slice when ``scattered``."""
        return landing_numel(group, self.ranks.world) if self.scattered(group) else group.numel

    def landing_bytes(self, group: ParamGroup) -> int:
        return self.landing_numel(group) * group.dtype.itemsize

    def write_back(self, group: ParamGroup) -> None:
        """Copy a resident group's new compute copy to the host copy the model object aliases, on the D2H lane
        once the update issued so far is done. The next update waits for it (``before_update``)."""
        if self.shared_compute and self.ranks.rank != 0:
            return       # the ranks' one shared copy: rank 0 writes it (finish_cycle's barrier follows)
        lanes = self.lanes
        if lanes is None:
            self.compute[group.index].copy_(self.device_compute[group.index])
            return
        self.written_back[group.index] = lanes.copy(self.compute[group.index], self.device_compute[group.index],
                                                    lanes.d2h, after=lanes.event(lanes.compute),
                                                    span=(None, "d2h", f"write back {group.name}", -1))

    def before_update(self, group: ParamGroup) -> None:
        """A resident group's update must not overwrite the weights its last write-back still reads."""
        event = self.written_back.pop(group.index, None)
        if event is not None:
            self.lanes.compute.wait_event(event)

    def host_copies_current(self) -> None:
        """Wait until every write-back has reached the host: the model object's parameters are current."""
        for event in self.written_back.values():
            if event is not None:
                event.synchronize()

    def on_ssd(self, group: ParamGroup) -> bool:
        return self.ssd is not None and group.index in self.ssd.groups

    def params_on_ssd(self, group: ParamGroup) -> bool:
        return self.ssd_params is not None and group.index in self.ssd_params.groups

    def sliced(self, group: ParamGroup) -> bool:
        """Whether this rank holds the group's optimizer states for its slice only (see ``state_range``)."""
        return self.ranks is not None and group.trainable and not self.on_ssd(group) and not self.on_gpu(group)

    def state_range(self, group: ParamGroup) -> tuple[int, int]:
        """The elements ``[start, end)`` of the group whose host-resident master and moments this process
        keeps: its slice with several ranks, else the whole group (also for states on SSD)."""
        return self.ranks.shard(group.numel) if self.sliced(group) else (0, group.numel)

    def host_states(self, group: ParamGroup) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(master, exp_avg, exp_avg_sq) of the elements ``state_range`` gives, in host memory."""
        i = group.index
        start, end = self.state_range(group)
        master = self.master[i]
        if master.numel() != end - start:    # an fp32 group: its master is the whole compute copy
            master = master[start:end]
        return master, self.exp_avg[i], self.exp_avg_sq[i]

    def _whole(self, group: ParamGroup, part: torch.Tensor) -> torch.Tensor:
        """The whole group of a state this rank keeps a slice of: every rank's slice, gathered (a collective)."""
        if not self.sliced(group):
            return part
        start, end = self.state_range(group)
        whole = torch.empty(group.numel, dtype=part.dtype)
        whole[start:end].copy_(part)
        return self.ranks.gather_(whole)

    # ------------------------------------------------------------------ values in
    def load(self, model: nn.Module, weights: str | os.PathLike | None = None, progress: bool = True,
             checkpoint: "TensorSet | None" = None, step: int = 0) -> None:
        """Fill master and compute copies from ``weights`` files, the model's tensors, or its initialiser; or
        every value and state (Adam moments, ``step`` updates done) from a ``checkpoint``."""
        if checkpoint is not None:
            self._load_checkpoint(checkpoint, step, progress)
            return
        files = _safetensors_files(weights) if weights is not None else None
        aliases = _aliases(model)
        on_meta = any(p.is_meta for p in model.parameters())
        init_cache: dict[str, dict[str, torch.Tensor]] = {}
        bar = _bar(self.groups, "ratel: loading parameters", progress)
        for g in self.groups:
            # A group whose fp32 master lives on SSD, or of which this rank keeps a slice, builds it here whole,
            # one group at a time. So does one whose compute copy the ranks share: what each rank read stays
            # its own until rank 0's values are known (they then all write the same bytes).
            shared = self.shared_compute and not self.params_on_ssd(g)
            resident = self.on_gpu(g)
            master = self.master.get(g.index)
            if g.trainable and (master is None or master.numel() != g.numel or shared or resident):
                master = torch.empty(g.numel, dtype=torch.float32)
            staged = torch.empty(g.numel, dtype=g.dtype) if self.params_on_ssd(g) or shared else None
            compute = staged if staged is not None else self.compute[g.index]
            for name, shape, offset in zip(g.params, g.shapes, g.offsets):
                numel = math.prod(shape)
                if files is not None:
                    value = _read_safetensors(files, aliases.get(name, [name]), shape)
                elif on_meta:
                    value = _initialise(model, name, init_cache, self.device)
                else:
                    value = model.get_parameter(name).detach()
                if tuple(value.shape) != tuple(shape):
                    raise RatelError(f"parameter {name}: the source has shape {tuple(value.shape)}, the model "
                                     f"{tuple(shape)}")
                flat = value.reshape(-1)
                if g.trainable:
                    master[offset:offset + numel].copy_(flat)
                    if g.dtype != torch.float32:
                        compute[offset:offset + numel].copy_(flat)
                else:
                    compute[offset:offset + numel].copy_(flat)
                bar.update(numel)
            if self.ranks is not None:
                # Every rank starts from rank 0's values, as DistributedDataParallel does: a model initialised
                # without a common seed would otherwise train a different start on each rank.
                self.ranks.from_rank0_(master if g.trainable else compute)
                if g.trainable and (g.dtype != torch.float32 or shared):
                    compute.copy_(master)
            if resident:
                if g.trainable:
                    if g.dtype == torch.float32:
                        compute.copy_(master)     # the model's copy (on the host an fp32 master is it)
                    self.master[g.index].copy_(master)
                self.device_compute[g.index].copy_(compute)
            if shared:
                self.compute[g.index].copy_(compute)
            elif staged is not None:
                self.ssd_params.initialize(g, staged)
            if g.trainable and self.on_ssd(g):
                self.ssd.initialize(g, master if g.dtype != torch.float32 else None)
            elif self.sliced(g) and g.dtype != torch.float32:
                start, end = self.state_range(g)
                self.master[g.index].copy_(master[start:end])
        bar.close()

    def _load_checkpoint(self, checkpoint: TensorSet, step: int, progress: bool) -> None:
        bar = _bar(self.groups, "ratel: loading the checkpoint", progress)
        for g in self.groups:
            staged = torch.empty(g.numel, dtype=g.dtype) if self.params_on_ssd(g) else None
            compute = staged if staged is not None else self.compute[g.index]
            if not g.trainable:
                for name, value in zip(g.params, g.views(compute)):
                    checkpoint.read_into(name, value)
                checkpoint.verify()
            else:
                with self._states_to_fill(g) as (master, exp_avg, exp_avg_sq):
                    for name, m, a, a2 in zip(g.params, g.views(master), g.views(exp_avg), g.views(exp_avg_sq)):
                        # An fp32 group's master is its compute copy, saved once, with the model's weights.
                        checkpoint.read_into(name if g.dtype == torch.float32 else f"master/{name}", m)
                        checkpoint.read_into(f"exp_avg/{name}", a)
                        checkpoint.read_into(f"exp_avg_sq/{name}", a2)
                    checkpoint.verify()      # before anything read reaches the SSD
                    if g.dtype != torch.float32:
                        compute.copy_(master)    # the rounding every update writes
                self.steps[g.index].fill_(step)
            if self.on_gpu(g) and not (g.trainable and g.dtype == torch.float32):
                self.device_compute[g.index].copy_(compute)    # (an fp32 master went there as the state it is)
            if staged is not None:
                self.ssd_params.initialize(g, staged)
            bar.update(g.numel)
        bar.close()

    @contextlib.contextmanager
    def _states_to_fill(self, g: ParamGroup):
        if self.on_ssd(g):
            with self.ssd.staged(g) as (master, exp_avg, exp_avg_sq):
                yield (self.master[g.index] if master is None else master), exp_avg, exp_avg_sq
        elif self.on_gpu(g):     # filled on the host, then sent to the GPU
            whole = [torch.empty(g.numel), torch.empty(g.numel), torch.empty(g.numel)]
            yield whole
            for kept, value in zip((self.master[g.index], self.exp_avg[g.index], self.exp_avg_sq[g.index]), whole):
                kept.copy_(value)
            if g.dtype == torch.float32:     # the master is the compute copy: the model's copy too
                self.compute[g.index].copy_(whole[0])
        elif not self.sliced(g):
            yield self.master[g.index], self.exp_avg[g.index], self.exp_avg_sq[g.index]
        else:    # filled whole, kept in this rank's slice (an fp32 group's master is its whole compute copy)
            fp32 = g.dtype == torch.float32
            whole = [self.master[g.index] if fp32 else torch.empty(g.numel), torch.empty(g.numel),
                     torch.empty(g.numel)]
            yield whole
            start, end = self.state_range(g)
            pairs = list(zip(self.host_states(g), whole))
            for kept, value in pairs[1:] if fp32 else pairs:
                kept.copy_(value[start:end])

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_entries(self) -> tuple[list, list]:
        """(name, dtype, shape) of what ``write_checkpoint`` writes, in order: the weights (compute dtype, the
        names of the model's first alias), and per trainable parameter its fp32 master (unless the compute
        copy is fp32 itself) and Adam moments."""
        weights, states = [], []
        for g in self.groups:
            for name, shape in zip(g.params, g.shapes):
                weights.append((name, g.dtype, tuple(shape)))
                if g.trainable:
                    kinds = ("exp_avg", "exp_avg_sq") if g.dtype == torch.float32 else ("master", "exp_avg", "exp_avg_sq")
                    states += [(f"{kind}/{name}", torch.float32, tuple(shape)) for kind in kinds]
        return weights, states

    def write_checkpoint(self, weights, states, progress: bool = True) -> None:
        """Stream every value and state into the writers ``weights`` and ``states`` (``put(name, tensor)``,
        ``wait_hashes()``), a group at a time: groups on SSD pass through one staging buffer, never all at once.
        With several ranks every rank calls it (the slices of each group's states are gathered group by group;
        ranks other than 0 pass writers that keep nothing), and a rank whose writer fails still takes part in
        the remaining gathers, then raises."""
        failed = None
        bar = _bar(self.groups, "ratel: saving the checkpoint", progress)
        for g in self.groups:
            if g.trainable:
                master, exp_avg, exp_avg_sq = self._states_to_save(g)
                masters, avgs, avg_sqs = g.views(master), g.views(exp_avg), g.views(exp_avg_sq)
            if failed is not None:
                continue
            if not self.on_gpu(g):
                compute = self.compute.get(g.index)
            elif g.trainable and g.dtype == torch.float32:
                compute = master      # its master is its compute copy, read from the GPU already
            else:
                compute = self.device_compute[g.index].cpu()
            held = None
            try:
                if compute is None and not g.trainable:
                    compute = held = self.ssd_params.acquire(g)
                values = g.views(compute) if compute is not None else None
                for i, name in enumerate(g.params):
                    # Trainable compute copies on SSD are the rounding of the master: rounded here, not read.
                    weights.put(name, values[i] if values is not None else masters[i].to(g.dtype))
                    if g.trainable:
                        if g.dtype != torch.float32:
                            states.put(f"master/{name}", masters[i])
                        states.put(f"exp_avg/{name}", avgs[i])
                        states.put(f"exp_avg_sq/{name}", avg_sqs[i])
                weights.wait_hashes()     # the staging buffers are reused by the next group
                states.wait_hashes()
            except BaseException as exc:  # noqa: BLE001 - re-raised after the other ranks' gathers
                if self.ranks is None:
                    raise
                failed = exc
            finally:
                if held is not None:
                    self.ssd_params.release(g, None)
            bar.update(g.numel)
        bar.close()
        if failed is not None:
            raise failed

    def _states_to_save(self, g: ParamGroup) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The whole group's (master, exp_avg, exp_avg_sq): this rank's slices gathered from every rank (read
        from its swap file first when on SSD, where each rank's file is current in its own slice)."""
        if self.on_gpu(g):
            return tuple(t.cpu() for t in (self.master[g.index], self.exp_avg[g.index], self.exp_avg_sq[g.index]))
        if self.on_ssd(g):
            master, exp_avg, exp_avg_sq = self.ssd.read_group(g)
            if self.ranks is not None:
                for state in (master, exp_avg, exp_avg_sq):
                    if state is not None:      # (an fp32 group's master is its compute copy: whole already)
                        self.ranks.gather_(state)
            return (self.master[g.index] if master is None else master), exp_avg, exp_avg_sq
        master, exp_avg, exp_avg_sq = self.host_states(g)
        master = self.compute[g.index] if g.dtype == torch.float32 else self._whole(g, master)
        return master, self._whole(g, exp_avg), self._whole(g, exp_avg_sq)

    # ------------------------------------------------------------------ values out
    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """fp32 master values (frozen parameters: their stored values) under every name the model uses."""
        out: dict[str, torch.Tensor] = {}
        aliases = _aliases(model)
        for g in self.groups:
            if self.on_gpu(g):
                source = (self.master if g.trainable else self.device_compute)[g.index].cpu()
            elif not g.trainable:
                source = self.compute[g.index] if not self.params_on_ssd(g) else self.ssd_params.acquire(g).clone()
                if self.params_on_ssd(g):
                    self.ssd_params.release(g, None)
            elif g.dtype == torch.float32:
                source = self.master[g.index]          # the compute copy: whole on every rank
            elif not self.on_ssd(g):
                source = self._whole(g, self.master[g.index])
            else:
                source = self.ssd.read_master(g)
                if self.ranks is not None:             # current in each rank's slice only
                    self.ranks.gather_(source)
            for name, shape, offset in zip(g.params, g.shapes, g.offsets):
                value = source[offset:offset + math.prod(shape)].view(shape).clone()
                for alias in aliases.get(name, [name]):
                    out[alias] = value
        return out

    def host_view(self, name: str) -> torch.Tensor | None:
        """The host copy of parameter ``name`` the GPU is fed from (for fp32 groups the master itself), shaped
        like the parameter; None when the parameter is not read by the graph or its copy lives on SSD."""
        location = self._param_location.get(name)
        if location is None:
            return None
        g = self.groups[location[0]]
        if self.params_on_ssd(g):
            return None
        k = location[1]
        shape, offset = g.shapes[k], g.offsets[k]
        return self.compute[g.index][offset:offset + math.prod(shape)].view(shape)

    # ------------------------------------------------------------------ GPU ring
    def unit_views(self, unit: int, slot: int) -> dict[str, torch.Tensor]:
        """Every parameter of ``unit`` as a view into ring slot ``slot`` (or, for a group resident on the GPU,
        into its tensor there)."""
        layout = self.plan.placement.layouts[unit]
        raw = self.ring[slot]
        views = {}
        for i in sorted(self.resident):
            g = self.groups[i]
            if unit in g.users:
                views.update(zip(g.params, g.views(self.device_compute[i])))
        for group_index, byte_offset in zip(layout.groups, layout.byte_offsets):
            g = self.groups[group_index]
            flat = raw[byte_offset: byte_offset + g.nbytes].view(g.dtype)
            for name, shape, offset in zip(g.params, g.shapes, g.offsets):
                views[name] = flat[offset: offset + math.prod(shape)].view(shape)
        return views

    def slot_group_views(self, unit: int, slot: int) -> list[tuple[ParamGroup, torch.Tensor]]:
        layout = self.plan.placement.layouts[unit]
        raw = self.ring[slot]
        return [(self.groups[i], raw[o: o + self.groups[i].nbytes].view(self.groups[i].dtype))
                for i, o in zip(layout.groups, layout.byte_offsets)]


def _bar(groups, desc: str, progress: bool):
    total = sum(g.numel for g in groups)
    return tqdm(total=total, unit="param", unit_scale=True, desc=desc, disable=not progress or total < 5e8)


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, canonical in canonical_parameter_names(model).items():
        out.setdefault(canonical, []).append(name)
    return out


def _safetensors_files(weights) -> list[Path]:
    path = Path(weights)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
    else:
        files = [path]
    if not files or not all(f.exists() for f in files):
        raise RatelError(f"no safetensors file at {weights}: pass a .safetensors file or a folder holding them")
    return files


def _read_safetensors(files: list[Path], names: list[str], shape) -> torch.Tensor:
    from safetensors import safe_open
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            keys = set(f.keys())
            for name in names:
                if name in keys:
                    return f.get_tensor(name)
    raise RatelError(f"parameter {names[0]} (shape {tuple(shape)}) is in none of {[str(f) for f in files]}; "
                     "the weights do not match the model's parameter names")


def materialise_module(model: nn.Module, module_path: str, device: str | torch.device = "cpu") -> nn.Module:
    """A copy of a meta-device module on ``device``, its own parameters and buffers filled by the model's
    initialiser (``init_module`` or ``_init_weights``, else the module's ``reset_parameters``). Children stay
    on meta."""
    owner = model.get_submodule(module_path) if module_path else model
    shell = copy.deepcopy(owner)
    shell.to_empty(device=device, recurse=False)   # only the owner's own tensors become real
    init = getattr(model, "init_module", None) or getattr(model, "_init_weights", None)
    with torch.no_grad():
        if init is not None:
            init(shell)
        elif hasattr(shell, "reset_parameters"):
            shell.reset_parameters()
        else:
            raise RatelError(f"cannot initialise {module_path or type(model).__name__} created on the meta "
                             "device: give the model an init_module(module) or _init_weights(module) method, "
                             "or pass weights=<safetensors path>")
    return shell


def _initialise(model: nn.Module, name: str, cache: dict[str, dict[str, torch.Tensor]],
                device: torch.device) -> torch.Tensor:
    """Materialise the module owning ``name``, a copy at a time, and run the model's initialiser. Training on
    a GPU, it runs there: the CPU draws random numbers on one thread (minutes for a 13B model), the GPU in
    milliseconds — from the CUDA generator, so the values differ from a CPU initialisation's."""
    module_path, _, leaf = name.rpartition(".")
    if module_path not in cache:
        shell = materialise_module(model, module_path, device if device.type == "cuda" else "cpu")
        cache.clear()   # modules come in order; keep one at a time
        cache[module_path] = {n: p.detach() for n, p in shell.named_parameters(recurse=False)}
    return cache[module_path][leaf]
