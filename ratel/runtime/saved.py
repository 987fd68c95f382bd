"""Saved activations of units that run their forward with autograd ("saved" mode, see plan_activations).

While such a unit's forward runs, ``saved_tensors_hooks`` see every tensor autograd keeps, in the order
the plan enumerated them (``UnitCost.packs``), and store each as the plan decided:
  parameter       a reference (the backward reads the parameter from whatever ring slot holds it then);
  unit input      a reference to the boundary value (checkpointed or kept by the activation store);
  kept (GPU)      the tensor itself;
  host / SSD      its whole storage copied out on the D2H lane into a pinned buffer (and on to SSD), once
                  per storage however many views autograd saved; fetched back one step before the backward;
  recompute       a recipe: the unit graph evaluates the value's node again from values it can rebuild.
Views are rebuilt with the geometry seen at pack time, so the backward gets exactly what autograd saved.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from ratel.errors import RatelError
from ratel.ir import PackRef, Tier, TransferKind, UnitActivations, UnitCall
from ratel.ir.layout import SAVED_SSD_REGIONS, saved_region_bytes, saved_ssd_offsets, saved_unit_bytes
from ratel.runtime.memory import Lanes, PinnedPool
from ratel.runtime.ssd_lane import Slot, StagingRing


@dataclass
class _Stored:
    host: torch.Tensor | None = None      # pinned bytes of the storage (for SSD values: in a staging region)
    nbytes: int = 0
    saved: Any = None                     # event: the copy out is done
    device: torch.Tensor | None = None    # flat device bytes (kept storage, or fetched back)
    ready: Any = None                     # event: the fetch is done
    ssd_offset: int | None = None         # where the value lives in its unit's swap file (SSD tier)


@dataclass
class UnitRun:
    """Everything a saved-mode unit's backward needs from its forward."""

    unit: int
    call: UnitCall
    module: fx.GraphModule
    outputs: tuple
    input_leaves: list
    param_leaves: list
    nodes: dict[str, fx.Node] = field(default_factory=dict)
    geometry: dict[str, tuple] = field(default_factory=dict)    # node -> (shape, stride, offset, dtype)
    stored: dict[str, _Stored] = field(default_factory=dict)     # value key -> storage copy
    # Filled in at backward time:
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    placeholder_values: dict[str, Any] = field(default_factory=dict)
    memo: dict[str, Any] = field(default_factory=dict)
    saved_keys: set[str] = field(default_factory=set)


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """The whole storage under ``t`` as a flat uint8 tensor."""
    storage = t.untyped_storage()
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage, 0, (storage.nbytes(),), (1,))


def _view(flat: torch.Tensor, shape, stride, offset, dtype) -> torch.Tensor:
    storage = flat.untyped_storage()
    return torch.empty(0, dtype=dtype, device=flat.device).set_(storage, offset, shape, stride)


class SavedActivations:
    """Per program: the pinned pool for swapped saved values and the pack/unpack hooks."""

    def __init__(self, lanes: Lanes, pool: PinnedPool | None, device: torch.device, ssd: "SsdSaved | None" = None):
        self.lanes = lanes
        self.pool = pool
        self.device = device
        self.ssd = ssd
        self._buffers: dict[tuple[int, str], torch.Tensor] = {}
        self.runs: dict[int, UnitRun] = {}
        self.recorder = None
        self.step = -1
        self.schedule = None      # the program's executor: the pack hook reports each value it copies out

    def clear(self) -> None:
        for unit in list(self.runs):
            self.release(unit)
        if self.ssd is not None:
            self.ssd.begin_step()

    # ------------------------------------------------------------------ forward
    def run_forward(self, unit: int, call: UnitCall, module: fx.GraphModule, plan: UnitActivations,
                    packs: tuple[PackRef, ...], inputs: tuple, params: list[torch.Tensor],
                    trainable: set[str], buffers: list[torch.Tensor]):
        """Run the unit with autograd, storing what it saves as planned; returns detached outputs."""
        decisions = {d.key: d for d in plan.decisions}
        input_leaves = [x.detach().requires_grad_(x.is_floating_point()) if isinstance(x, torch.Tensor) else x
                        for x in inputs]
        param_leaves = [p.detach().requires_grad_(name in trainable) for name, p in zip(call.params, params)]
        run = UnitRun(unit=unit, call=call, module=module, outputs=(), input_leaves=input_leaves,
                      param_leaves=param_leaves, nodes={n.name: n for n in module.graph.nodes},
                      saved_keys=set(decisions))
        owners: dict[int, tuple[str, str, torch.Tensor]] = {}
        for name, leaf in zip(call.inputs, input_leaves):
            if isinstance(leaf, torch.Tensor):
                owners[leaf.untyped_storage().data_ptr()] = ("input", name, leaf)
        for name, leaf in zip(call.params, param_leaves):
            owners.setdefault(leaf.untyped_storage().data_ptr(), ("ring", "", leaf))
        param_base = {name: leaf for name, leaf in zip(call.params, param_leaves)}
        counter = iter(range(1 << 62))

        def pack(t: torch.Tensor):
            i = next(counter)
            ref = packs[i] if i < len(packs) else None
            if ref is None or tuple(t.shape) != ref.shape or t.dtype != ref.dtype:
                raise RatelError(f"unit {call.name}: autograd saved tensor #{i} {tuple(t.shape)} {t.dtype}, the plan "
                                 f"expected {ref.shape if ref else 'nothing'}; the plan was made for another device "
                                 "or torch version: compile again on this machine, or use activations='recompute'")
            geometry = (tuple(t.shape), tuple(t.stride()), int(t.storage_offset()), t.dtype)
            if ref.source == "param":
                base = param_base[ref.name]
                return ("param", ref.name, geometry[:2] + (geometry[2] - base.storage_offset(),) + geometry[3:])
            if ref.source == "input":
                base = owners[t.untyped_storage().data_ptr()][2]
                return ("input", ref.name, geometry[:2] + (geometry[2] - base.storage_offset(),) + geometry[3:])
            if ref.source == "buffer" or t.device != self.device:
                return ("tensor", t)      # buffers stay resident; host-side scalars (RNG seeds) are tiny
            decision = decisions[ref.name]
            if decision.tier == Tier.GPU:
                run.stored.setdefault(ref.name, _Stored(device=_flat_bytes(t)))
                return ("tensor", t.detach())   # its own handle: the forward's outputs are emptied below
            if decision.tier is None:
                return ("recompute", ref.name, geometry)
            if ref.name not in run.stored:
                if self.schedule is not None:
                    self.schedule.report(TransferKind.OFFLOAD_SAVED, unit=unit, value=ref.name)
                if decision.tier == Tier.SSD:
                    run.stored[ref.name] = self.ssd.copy_out(unit, ref.name, t, self.lanes, self.recorder, self.step)
                else:
                    run.stored[ref.name] = self._copy_out(unit, ref.name, t)
            return ("stored", ref.name, geometry)

        def unpack(packed):
            kind = packed[0]
            if kind == "tensor":
                return packed[1]
            shape, stride, offset, dtype = packed[2]
            if kind == "param":
                base = run.params[packed[1]]
                return base.as_strided(shape, stride, base.storage_offset() + offset)
            if kind == "input":
                base = run.inputs[packed[1]]
                return base.as_strided(shape, stride, base.storage_offset() + offset)
            if kind == "stored":
                return _view(self._device_bytes(run, packed[1]), shape, stride, offset, dtype)
            value = self._recompute(run, packed[1])
            return _view(_flat_bytes(value), shape, stride, offset, dtype)

        # The layouts of node values are read only to rebuild a value the plan recomputes: without one, the
        # unit runs as generated code, not node by node through the interpreter (~15 us of host work a node).
        rebuilt = any(d.tier is None for d in plan.decisions)
        run_unit = _Geometry(module, run, set(decisions)).run if rebuilt else module
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            outputs = run_unit(*input_leaves, *param_leaves, *buffers)
        returned = tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in outputs)
        run.outputs = tuple(outputs)
        # Autograd needs the inputs and outputs of the unit only as graph nodes of the right shape: the backward
        # reads inputs from the activation store, and the outputs live on in the tensors returned. Dropping the
        # forward's references lets a value checkpointed to host leave the GPU as planned (a zero-stride stand-in
        # keeps each shape for autograd's checks).
        for t in list(input_leaves) + list(outputs):
            if isinstance(t, torch.Tensor):
                t.data = torch.zeros((), dtype=t.dtype, device=t.device).expand(t.shape)
        self.runs[unit] = run
        if self.ssd is not None:
            on_ssd = [key for key, s in run.stored.items() if s.ssd_offset is not None]
            if self.schedule is not None:
                for key in on_ssd:
                    self.schedule.report(TransferKind.SSD_WRITE_SAVED, unit=unit, value=key)
            self.ssd.write_behind(unit, [run.stored[key] for key in on_ssd])
        return returned

    def _copy_out(self, unit: int, key: str, t: torch.Tensor) -> _Stored:
        flat = _flat_bytes(t)
        n = flat.numel()
        buffer = self._buffers.get((unit, key))
        if buffer is None or buffer.numel() < n:
            buffer = self.pool.take(n) if self.pool is not None else torch.empty(n, dtype=torch.uint8)
            self._buffers[(unit, key)] = buffer
        host = buffer[:n]
        saved = self.lanes.copy(host, flat, self.lanes.d2h, after=self.lanes.event(),
                                span=(self.recorder, "d2h", f"saved {key}", self.step))
        return _Stored(host=host, nbytes=n, saved=saved)

    # ------------------------------------------------------------------ backward
    def read_ahead(self, unit: int) -> None:
        """Start reading a unit's SSD-resident values into host staging (two steps before its backward)."""
        run = self.runs.get(unit)
        if run is not None and self.ssd is not None:
            self.ssd.read_ahead(unit, [s for s in run.stored.values() if s.ssd_offset is not None])

    def fetch(self, unit: int) -> None:
        """Start copying a unit's swapped values back to the device (one step before its backward)."""
        run = self.runs.get(unit)
        if run is None:
            return
        on_ssd = [s for s in run.stored.values() if s.ssd_offset is not None and s.device is None]
        if on_ssd:
            self.ssd.wait_read(unit, on_ssd)
        last = None
        for key, stored in run.stored.items():
            if stored.host is not None and stored.device is None:
                flat = self.lanes.landing(stored.nbytes)
                stored.ready = self.lanes.copy(flat, stored.host, self.lanes.h2d, after=stored.saved,
                                               span=(self.recorder, "h2d", f"saved {key}", self.step))
                stored.device = flat
                last = stored if stored.ssd_offset is not None else last
        if last is not None:
            self.ssd.region_read_out(unit, last.ready)

    def _device_bytes(self, run: UnitRun, key: str) -> torch.Tensor:
        stored = run.stored[key]
        if stored.device is None:
            self.fetch(run.unit)
        self.lanes.wait_compute(stored.ready)
        stored.ready = None
        return stored.device

    def _recompute(self, run: UnitRun, key: str):
        """Evaluate a node of the unit graph again, from values that are stored or recomputable.

        Only saved values are kept (until the unit's backward ends: what the plan counts as recomputed
        bytes); intermediate nodes on the way are dropped once this value is built."""
        placeholders = run.placeholder_values
        local: dict[str, Any] = {}

        def value(n: fx.Node):
            if n.name in run.memo:
                return run.memo[n.name]
            if n.name in local:
                return local[n.name]
            if n.op == "placeholder":
                return placeholders[n.name]
            if n.op == "get_attr":
                return getattr(run.module, n.target)
            if n.name in run.stored and n.name in run.geometry:
                shape, stride, offset, dtype = run.geometry[n.name]
                result = _view(self._device_bytes(run, n.name), shape, stride, offset, dtype)
            else:
                args = fx.node.map_arg(n.args, value)
                kwargs = fx.node.map_arg(n.kwargs, value)
                with torch.no_grad():
                    result = n.target(*args, **kwargs)
                expected = run.geometry.get(n.name)
                if expected is not None and isinstance(result, torch.Tensor) and (
                        tuple(result.shape), tuple(result.stride()), int(result.storage_offset())) != expected[:3]:
                    # A kernel chose another layout than in the forward (e.g. another attention backend without
                    # autograd): rebuild the forward's layout, since saved views are addressed within it.
                    shape, stride, offset, dtype = expected
                    flat = torch.empty(offset + 1 + sum((s - 1) * st for s, st in zip(shape, stride)) if shape else 1,
                                       dtype=dtype, device=result.device)
                    laid_out = flat.as_strided(shape, stride, offset)
                    laid_out.copy_(result)
                    result = laid_out
            (run.memo if n.name in run.saved_keys else local)[n.name] = result
            return result

        try:
            return value(run.nodes[key])
        finally:
            # ``value`` refers to itself (recursion), so it and ``local`` form a cycle only the garbage
            # collector would free: empty it now, or the intermediates outlive this unit's backward.
            local.clear()

    def prepare_backward(self, unit: int, params: dict[str, torch.Tensor], inputs: dict[str, Any],
                         buffers: dict[str, torch.Tensor]) -> UnitRun:
        run = self.runs[unit]
        run.params = params
        run.inputs = inputs
        run.buffers = buffers
        placeholders = [n for n in run.module.graph.nodes if n.op == "placeholder"]
        values = ([inputs[name] for name in run.call.inputs] + [params[name] for name in run.call.params]
                  + [buffers[name] for name in run.call.buffers])
        run.placeholder_values = {n.name: v for n, v in zip(placeholders, values)}
        return run

    def release(self, unit: int) -> None:
        """Forget a unit after its backward. The hooks' closures reference the run, and the run's outputs
        reference the autograd graph holding those closures: the cycle is cut here, or nodes autograd did
        not execute would keep the run, its gradient buffers and its values alive."""
        run = self.runs.pop(unit, None)
        if run is None:
            return
        for leaf in run.param_leaves:
            if isinstance(leaf, torch.Tensor):
                leaf.grad = None
        run.outputs = ()
        run.input_leaves = []
        run.param_leaves = []
        run.memo.clear()
        run.stored.clear()
        run.placeholder_values.clear()
        run.params = run.inputs = run.buffers = {}


class _Geometry(fx.Interpreter):
    """Runs the unit graph and records the layout of the nodes whose values the plan stores or recomputes:
    the backward rebuilds them from their storage bytes."""

    def __init__(self, module: fx.GraphModule, run: UnitRun, keys: set[str]):
        super().__init__(module)
        self._unit_run = run
        self._keys = keys

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.name in self._keys and isinstance(out, torch.Tensor):
            self._unit_run.geometry[n.name] = (tuple(out.shape), tuple(out.stride()), int(out.storage_offset()),
                                               out.dtype)
        return out


class SsdSaved:
    """Saved values on SSD: one swap file per unit, staged through a ring of pinned regions on the SSD lane.

    Forward: a unit's SSD values are copied (D2H) into region ``unit % REGIONS`` and written behind to the
    unit's file once those copies are done; the region is reused only after that write. Backward: a unit's
    values are read back into its region two steps ahead, once the region's previous contents went to the GPU,
    and the H2D fetch waits for that read. A region still holding a unit's values from the forward (the last
    units) is fetched without any read.
    """

    REGIONS = SAVED_SSD_REGIONS

    def __init__(self, lane, acts, pool: PinnedPool, name: str):
        self.lane = lane
        self.layout = saved_ssd_offsets(acts)
        region = saved_region_bytes(acts)
        unit_bytes = saved_unit_bytes(acts)
        self.ring = StagingRing([pool.take(region) for _ in range(self.REGIONS)])   # slot k: units k, k+3, ...
        self.regions = self.ring.slots
        self.files = {u: lane.file(f"{name}/{u:04d}.act", unit_bytes[u]) for u in self.layout if unit_bytes[u]}
        self.reads: dict[int, Any] = {}       # unit -> its read back (None: still in its region)
        self._claimed: set[int] = set()       # units that took their region in this step's forward

    def _region(self, unit: int) -> Slot:
        return self.regions[unit % self.REGIONS]

    def begin_step(self) -> None:
        self._claimed.clear()
        self.reads.clear()

    def copy_out(self, unit: int, key: str, t: torch.Tensor, lanes: Lanes, recorder, step: int) -> _Stored:
        region = self._region(unit)
        if unit not in self._claimed:
            region.settle()              # what it held is on SSD, and its last copy to the GPU is done
            region.holds = unit
            self._claimed.add(unit)
        flat = _flat_bytes(t)
        offset = self.layout[unit][key]
        host = region.data[offset: offset + flat.numel()]
        saved = lanes.copy(host, flat, lanes.d2h, after=lanes.event(), span=(recorder, "d2h", f"saved {key}", step))
        return _Stored(host=host, nbytes=flat.numel(), saved=saved, ssd_offset=offset)

    def write_behind(self, unit: int, stored: list[_Stored]) -> None:
        if stored:
            self._region(unit).io = self.lane.write(self.files[unit], [(s.ssd_offset, s.host) for s in stored],
                                                    after=[s.saved for s in stored])

    def read_ahead(self, unit: int, stored: list[_Stored]) -> None:
        if not stored or unit in self.reads:
            return
        region = self._region(unit)
        if region.holds == unit:         # still in the region since the forward
            self.reads[unit] = None
            return
        region.holds = unit
        self.reads[unit] = region.load(self.lane, self.files[unit], [(s.ssd_offset, s.host) for s in stored])

    def wait_read(self, unit: int, stored: list[_Stored]) -> None:
        if unit not in self.reads:
            self.read_ahead(unit, stored)
        if self.reads[unit] is not None:
            self.reads[unit].wait()

    def region_read_out(self, unit: int, event) -> None:
        self._region(unit).read_out = event
        self.reads.pop(unit, None)

    def close(self) -> None:
        self.ring.settle()

