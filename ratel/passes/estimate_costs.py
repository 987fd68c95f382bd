"""estimate_costs: FLOPs per node and per unit, and the GPU bytes each unit's compute needs.

Stages:
  1. FLOPs per node (``node.meta["ratel.cost"] = NodeCost``), for the matrix-class ops that dominate time.
     Counting follows docs/architecture.md: a (m×k)·(k×n) product is 2·m·k·n; attention is 4·b·heads·s_q·s_k·d forward
     (causal not halved); backward is 2× forward. Element-wise ops count 0: their cost is memory traffic.
  2. Memory per unit, by running the unit's graph on tensors without data — meta tensors, or fake tensors
     of the target GPU when this machine has it (``profile_unit``) — with a storage-level peak tracker
     (``PeakMemory``; no real allocation, so a 175B plan is made on a laptop): the peak of a no-grad forward
     (``fwd_workspace``), the bytes autograd saves (``saved_bytes``, deduplicated by storage), and the peak
     of recompute + backward (``bwd_workspace``, including parameter and input gradients). Inputs and
     parameters are excluded: the planner accounts for them. Units with the same graph and input shapes
     (the repeated blocks) are measured once.
  3. Seconds per unit on the target device, when it is this machine's and timing is on
     (``PassContext.measure_units`` / ``RATEL_MEASURE_UNITS``; ``passes/time_units.py``): each distinct
     unit run with random data, cached per machine and unit signature, stored in ``UnitCost.fwd_seconds``,
     ``grad_fwd_seconds`` and ``bwd_seconds`` for the simulator. A unit whose bytes do not fit keeps None
     (priced from FLOPs).

Before / after: the graph is unchanged; nodes gain ``# flops=...`` in dumps and the ``CostModel`` analysis
holds one ``UnitCost`` per unit.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from ratel.ir import (META_COST, META_TENSOR, META_UNIT_CALL, CostModel, NodeCost, PackRef, SavedValue, UnitCall,
                      UnitCost, format_bytes)
from ratel.passes import time_units
from ratel.passes.canonicalize_graph import canonicalize
from ratel.ir.losses import linear_cross_entropy, vocab_align
from ratel.passes.manager import PassContext, PassResult, graph_pass
from ratel.trace import is_random

log = logging.getLogger("ratel.passes")
aten = torch.ops.aten

# Safety margin over the fake-tensor measurement on CUDA: real kernels may keep workspaces the meta kernels
# do not show (cuBLAS, attention backends), and the caching allocator rounds every block up. On the CPU the
# "GPU tier" is plain host tensors, measured exactly.
WORKSPACE_MARGIN = 1.10
WORKSPACE_SLACK = 16 << 20


def workspace_bound(measured: int, device: str) -> int:
    if device.startswith("cuda"):
        return int(measured * WORKSPACE_MARGIN) + WORKSPACE_SLACK
    return measured


def _shape(node) -> tuple[int, ...]:
    return tuple(node.meta[META_TENSOR].shape)


def node_flops(node: fx.Node) -> NodeCost:
    """Forward and backward FLOPs of one node; 0 for anything that is not a matrix product or attention."""
    t = node.target
    try:
        if t == aten.linear.default:
            x, w = node.args[0], node.args[1]
            fwd = 2 * math.prod(_shape(x)[:-1]) * math.prod(_shape(w))
        elif t in (aten.mm.default, aten.bmm.default, aten.matmul.default, aten.addmm.default,
                   aten.baddbmm.default):
            a, b = (node.args[1], node.args[2]) if t in (aten.addmm.default, aten.baddbmm.default) else node.args[:2]
            out = _shape(node)
            fwd = 2 * math.prod(out) * _shape(a)[-1]
        elif t in (aten.scaled_dot_product_attention.default,):
            q, k, v = (_shape(a) for a in node.args[:3])
            fwd = 2 * math.prod(q[:-1]) * k[-2] * q[-1] + 2 * math.prod(q[:-1]) * k[-2] * v[-1]
        elif t is linear_cross_entropy:
            # The backward computes the chunk's logits again before its two products: three times the forward.
            hidden, weight, seq_slice = _shape(node.args[0]), _shape(node.args[1]), node.args[7]
            if seq_slice is not None:
                hidden = (hidden[0], len(range(hidden[1])[seq_slice[0]:seq_slice[1]]), *hidden[2:])
            fwd = 2 * math.prod(hidden[:-1]) * math.prod(weight)
            return NodeCost(int(fwd), int(3 * fwd))
        else:
            return NodeCost(0, 0)
    except (KeyError, AttributeError, IndexError):
        return NodeCost(0, 0)
    return NodeCost(int(fwd), int(2 * fwd))


def _fake_inputs(metas, device, requires_grad):
    """Fake placeholders; ``requires_grad``: False, or one flag per placeholder (frozen parameters save
    less: autograd keeps nothing for a weight gradient nobody asks for)."""
    out = []
    flags = requires_grad if isinstance(requires_grad, (list, tuple)) else [requires_grad] * len(metas)
    for meta, wants_grad in zip(metas, flags):
        if meta is None:
            out.append(None)
            continue
        t = torch.empty(meta.shape, dtype=meta.dtype, device=device)
        if wants_grad and meta.dtype.is_floating_point:
            t.requires_grad_(True)
        out.append(t)
    return out


class PeakMemory(TorchDispatchMode):
    """Peak bytes of tensor storage that ops allocate while active (works on fake tensors).

    Each op's outputs are registered by storage (views share one); after every op, storages nothing holds
    any more are dropped. The peak is read right after an op allocated, before its dead inputs are freed,
    as a caching allocator sees it. Storages that existed before (inputs, parameters) are not counted.

    ``carried``: storages a previous tracker left alive (what a forward leaves for its backward), counted as
    live from the start and freed when they die; ``new_peak`` is the peak of what this tracker allocated.
    ``meta_only``: every tensor must be a meta tensor (an op that would allocate real memory raises
    ``_NotOnMeta`` before it runs). ``as_cpu``: meta tensors standing in for CPU ones, whose layer norm keeps
    its statistics in the input's dtype (meta kernels keep them in float, as CUDA does).
    """

    def __init__(self, preexisting=(), meta_only: bool = False, carried: dict | None = None,
                 as_cpu: bool = False):
        super().__init__()
        self.meta_only = meta_only
        self.as_cpu = as_cpu
        self.ignore = set(preexisting)
        self.live: dict[StorageWeakRef, int] = dict(carried or {})
        self.carried = set(self.live)
        self.current = sum(self.live.values())
        self.peak = self.current
        self.new_current = 0
        self.new_peak = 0

    def _expire(self) -> None:
        for key in [k for k in self.live if k.expired()]:
            nbytes = self.live.pop(key)
            self.current -= nbytes
            if key not in self.carried:
                self.new_current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._expire()   # what Python dropped since the last op is free before this one allocates
        if self.meta_only:
            device = (kwargs or {}).get("device")
            if device is not None and torch.device(device).type != "meta":
                raise _NotOnMeta(f"{func} makes a tensor on {device}")
        out = func(*args, **(kwargs or {}))
        if self.as_cpu and func is aten.native_layer_norm.default:
            out = (out[0], *(torch.empty(t.shape, dtype=args[0].dtype, device=t.device) for t in out[1:]))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                if self.meta_only and t.device.type != "meta":
                    raise _NotOnMeta(f"{func} returned a tensor on {t.device}")
                key = StorageWeakRef(t.untyped_storage())
                if key not in self.live and key not in self.ignore:
                    self.live[key] = t.untyped_storage().nbytes()
                    self.current += self.live[key]
                    self.new_current += self.live[key]
        self.peak = max(self.peak, self.current)
        self.new_peak = max(self.new_peak, self.new_current)
        self._expire()
        return out


@dataclass(frozen=True)
class UnitProfile:
    """Everything measured by running one unit graph on fake tensors (see ``profile_unit``)."""

    fwd_workspace: int
    saved_bytes: int
    bwd_workspace: int
    output_bytes: int
    grad_fwd_workspace: int
    bwd_only_workspace: int
    saved: tuple[SavedValue, ...]
    packs: tuple[PackRef, ...]


class _FusedAttention(torch.autograd.Function):
    """Attention with the memory CUDA's fused kernels use (memory-efficient attention: it takes masks and
    dropout; flash keeps the same tensors): the output and a float log-sum-exp per query row are saved,
    never the scores. Only run on tensors without data (see ``_stand_in``)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, dropout_p, is_causal, scale):
        if mask is not None and mask.dtype == torch.bool:   # as sdpa converts a boolean mask on CUDA
            mask = torch.zeros_like(mask, dtype=q.dtype).masked_fill_(mask.logical_not(), float("-inf"))
        out, lse, seed, offset = aten._scaled_dot_product_efficient_attention(
            q, k, v, mask, True, dropout_p, is_causal, scale=scale)
        ctx.save_for_backward(q, k, v, mask, out, lse, seed, offset)
        ctx.dropout_p, ctx.is_causal, ctx.scale = dropout_p, is_causal, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, mask, out, lse, seed, offset = ctx.saved_tensors
        wanted = [q.requires_grad, k.requires_grad, v.requires_grad, False]
        gq, gk, gv, _ = aten._scaled_dot_product_efficient_attention_backward(
            grad, q, k, v, mask, out, lse, seed, offset, ctx.dropout_p, wanted, ctx.is_causal, scale=ctx.scale)
        return gq, gk, gv, None, None, None, None


def _fused_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False):
    if enable_gqa and q.shape[-3] != k.shape[-3]:   # CUDA's efficient kernel takes no grouped heads
        return aten.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=scale,
                                                 enable_gqa=enable_gqa)
    return _FusedAttention.apply(q, k, v, attn_mask, dropout_p, is_causal, scale)


def _stand_in(sub: fx.GraphModule, device: str, tensors_on: str) -> fx.GraphModule:
    """A copy of a unit for ``device`` that runs on ``tensors_on`` tensors: its device arguments retargeted,
    its attention taking the kernel ``device`` would. Why: the CPU's (under dropout) and meta's
    scaled_dot_product_attention take the math path, holding batch x heads x seq² scores (16 GiB per
    GPT-3-sized block at 8 x 1024) that CUDA's fused kernels never make; and meta never takes the CPU's
    flash kernel. A CPU unit on fake CPU tensors needs neither."""
    attention = (_fused_attention if device.startswith("cuda") else
                 _attend_as_the_cpu_does if tensors_on == "meta" else None)
    copied = copy.deepcopy(sub)
    for module in [m for m in copied.modules() if isinstance(m, fx.GraphModule)]:
        canonicalize(module, torch.device(device), torch.device(tensors_on))
        calls = [n for n in module.graph.nodes if attention is not None and n.op == "call_function"
                 and n.target is aten.scaled_dot_product_attention.default]
        for node in calls:
            node.target = attention
        # The head's loss pads its products' vocabulary as the target does (on meta tensors it would not).
        heads = [n for n in module.graph.nodes if n.op == "call_function" and n.target is linear_cross_entropy]
        for node in heads:
            node.kwargs = {**node.kwargs, "align": vocab_align(torch.device(device))}
        if calls or heads:
            module.recompile()
    return copied


_SDPA_FLASH = 1   # torch's SDPBackend numbering, as ``torch._fused_sdp_choice`` answers


def _attend_as_the_cpu_does(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None,
                            enable_gqa=False):
    """scaled_dot_product_attention on meta tensors with the kernel the CPU picks for these inputs (meta
    always takes the math path): torch's own choice, asked of CPU tensors of the same geometry that are
    allocated but never touched, then the ops the CPU's flash path runs (a boolean mask made additive)."""
    def untouched(t):
        if t is None:
            return None
        real = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu")
        return real.requires_grad_(t.requires_grad) if t.dtype.is_floating_point else real
    with _disable_current_modes():      # the measuring mode sees only the meta ops
        choice = torch._fused_sdp_choice(untouched(q), untouched(k), untouched(v), untouched(attn_mask),
                                         dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    if choice != _SDPA_FLASH:
        return aten.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=scale,
                                                 enable_gqa=enable_gqa)
    if enable_gqa and q.shape[-3] != k.shape[-3]:
        raise _NotOnMeta("grouped-query attention on the CPU's flash kernel")
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        neg_inf = torch.scalar_tensor(float("-inf"), dtype=q.dtype, device=q.device)
        zero = torch.scalar_tensor(0.0, dtype=q.dtype, device=q.device)
        attn_mask = torch.where(attn_mask, zero, neg_inf)
    return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal, attn_mask=attn_mask,
                                                            scale=scale)[0]


def _random_node(node: fx.Node) -> bool:
    return is_random(node)


def profile_unit(sub: fx.GraphModule, call: UnitCall, device: str,
                 trainable: frozenset[str] | None = None) -> UnitProfile:
    """Run a unit graph on tensors without data: with and without autograd, recording what autograd saves.

    Placeholders are the unit's activations, then parameters, then buffers (``UnitCall`` order). Each saved
    tensor is traced to the graph value owning its storage (an fx Interpreter records node outputs), so
    the planner can recompute it from its node or move it as a whole storage, views rebuilt on the way back.

    A unit for the CPU, or for CUDA on a machine without it, runs on meta tensors (five times cheaper than
    fake tensors at a new shape: a new input shape re-plans every unit), its attention calls taking the
    kernel the target would (``_stand_in``); a unit meta kernels cannot run, and a unit for a GPU this
    machine has, runs on fake tensors of the target device (sdpa then picks its real backend).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    if device.startswith("cuda") and torch.cuda.is_available():
        with FakeTensorMode(allow_non_fake_inputs=True):
            return _measure(sub, call, device, trainable)
    try:
        return _measure(_stand_in(sub, device, "meta"), call, "meta", trainable, names_from=sub,
                        as_cpu=device == "cpu")
    except (NotImplementedError, RuntimeError, _NotOnMeta) as why:
        log.debug("ratel: unit %s measured on fake tensors (meta: %s)", call.module, why)
    # Planning for a GPU this machine lacks: fake CUDA tensors cannot run autograd without CUDA, so the unit
    # is measured as CPU kernels would run it.
    measured = sub if device == "cpu" else _stand_in(sub, device, "cpu")
    with FakeTensorMode(allow_non_fake_inputs=True):
        return _measure(measured, call, "cpu", trainable, names_from=sub)


class _NotOnMeta(Exception):
    """This unit needs fake tensors (an input with no tensor metadata, an attention the stand-in cannot
    place)."""


def _measure(sub: fx.GraphModule, call: UnitCall, tensor_device: str, trainable,
             names_from: fx.GraphModule | None = None, as_cpu: bool = False) -> UnitProfile:
    """The body of ``profile_unit``: tensors on ``tensor_device`` (meta, or fake under an active mode)."""
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    metas = [n.meta.get(META_TENSOR) for n in placeholders]
    if tensor_device == "meta" and any(m is None and isinstance(n.meta.get("val"), torch.Tensor)
                                       for m, n in zip(metas, placeholders)):
        raise _NotOnMeta("a tensor input without metadata")
    # As the runtime runs the unit: activations require grad, parameters only when trainable, buffers never.
    wants_grad = ([True] * len(call.inputs)
                  + [trainable is None or name in trainable for name in call.params] + [False] * len(call.buffers))
    sources = (["input"] * len(call.inputs) + ["param"] * len(call.params) + ["buffer"] * len(call.buffers))
    names = list(call.inputs) + list(call.params) + list(call.buffers)
    output_node = next(n for n in sub.graph.nodes if n.op == "output")
    out_metas = [n.meta.get(META_TENSOR) for n in output_node.args[0]]
    output_bytes = sum(m.nbytes for m in out_metas if m is not None)
    nodes = {n.name: n for n in (names_from or sub).graph.nodes}
    args = _fake_inputs(metas, tensor_device, requires_grad=False)
    args = [a if a is not None else n.meta.get("val") for a, n in zip(args, placeholders)]
    storages = [StorageWeakRef(a.untyped_storage()) for a in args if isinstance(a, torch.Tensor)]
    with torch.no_grad(), PeakMemory(storages, meta_only=tensor_device == "meta", as_cpu=as_cpu) as tracker:
        outs = sub(*args)
        del outs
    fwd_peak = tracker.peak

    # Forward with autograd, recording every saved tensor and which graph value owns its storage.
    grad_args = _fake_inputs(metas, tensor_device, requires_grad=wants_grad)
    grad_args = [a if a is not None else n.meta.get("val") for a, n in zip(grad_args, placeholders)]
    leaves = [a for a in grad_args if isinstance(a, torch.Tensor) and a.requires_grad]
    owner: dict[StorageWeakRef, tuple[str, str]] = {}
    for source, name, a in zip(sources, names, grad_args):
        if isinstance(a, torch.Tensor):
            owner[StorageWeakRef(a.untyped_storage())] = (source, name)
    input_storages = set(owner)

    class _Owners(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    owner.setdefault(StorageWeakRef(t.untyped_storage()), ("value", n.name))
            return out

    raw: list[tuple[StorageWeakRef, torch.Tensor]] = []

    def pack(t):
        # Resolved after the forward: an op saves its output before the Interpreter sees it returned.
        raw.append((StorageWeakRef(t.untyped_storage()), t))
        return t

    with PeakMemory(input_storages, meta_only=tensor_device == "meta", as_cpu=as_cpu) as tracker:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            outs = _Owners(sub).run(*grad_args)
    grad_fwd_peak = tracker.peak
    packs: list[PackRef] = []
    values: dict[str, SavedValue] = {}
    for key, t in raw:
        source, name = owner.get(key, ("value", None))
        if name is None:
            name = f"internal:{len(packs)}"
            owner[key] = ("value", name)
        if source == "value" and name not in values:
            node = nodes.get(name)
            recomputable = node is not None and node.op == "call_function" and not _random_node(node)
            cost = node_flops(node) if node is not None else NodeCost(0, 0)
            touched = t.untyped_storage().nbytes() + sum(
                a.meta[META_TENSOR].value_bytes for a in (node.all_input_nodes if node is not None else ())
                if a.meta.get(META_TENSOR) is not None)
            val = node.meta.get("val") if node is not None else None
            geometry = ((tuple(val.shape), tuple(val.stride()), int(val.storage_offset()))
                        if isinstance(val, torch.Tensor) else ((), (), 0))
            values[name] = SavedValue(key=name, node=node.name if node is not None else None,
                                      nbytes=t.untyped_storage().nbytes(), recompute_flops=cost.fwd_flops,
                                      recompute_bytes=touched, recomputable=recomputable and bool(geometry[0]),
                                      shape=geometry[0], stride=geometry[1], offset=geometry[2])
        packs.append(PackRef(index=len(packs), source=source, name=name, shape=tuple(t.shape),
                             stride=tuple(t.stride()), offset=int(t.storage_offset()), dtype=t.dtype))
    raw.clear()   # the fake tensors it holds are no longer needed
    t = None      # the loop variable held the last saved tensor
    # The backward, from what the forward left alive: its new allocations alone are the backward of a
    # unit that kept its activations; with what the forward left, less what autograd frees on the way,
    # the backward of a checkpointed unit after its recompute (whose forward peaks as this one did).
    tracker._expire()
    with PeakMemory(input_storages, meta_only=tensor_device == "meta", as_cpu=as_cpu, carried=tracker.live) as tracker:
        diff = [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]
        if diff and leaves:
            torch.autograd.backward(diff, [torch.ones_like(o) for o in diff], inputs=leaves)
        del outs, diff
    bwd_only_peak = tracker.new_peak
    bwd_peak = max(grad_fwd_peak, tracker.peak)
    return UnitProfile(fwd_workspace=fwd_peak, saved_bytes=sum(v.nbytes for v in values.values()),
                   bwd_workspace=bwd_peak, output_bytes=output_bytes, grad_fwd_workspace=grad_fwd_peak,
                   bwd_only_workspace=bwd_only_peak, saved=tuple(values.values()), packs=tuple(packs))


def _rename(profile: UnitProfile, old: UnitCall, new: UnitCall, old_sub: fx.GraphModule,
            new_sub: fx.GraphModule) -> UnitProfile:
    """A profile measured on a unit of identical structure, with parameter, input and node names mapped
    (nodes correspond by position: ``structure_key`` matched them)."""
    names = {**dict(zip(old.inputs, new.inputs)), **dict(zip(old.params, new.params)),
             **dict(zip(old.buffers, new.buffers))}
    nodes = {a.name: b.name for a, b in zip(old_sub.graph.nodes, new_sub.graph.nodes)}
    packs = tuple(dataclasses.replace(p, name=(nodes.get(p.name, p.name) if p.source == "value"
                                               else names.get(p.name, p.name))) for p in profile.packs)
    saved = tuple(dataclasses.replace(v, key=nodes.get(v.key, v.key),
                                      node=nodes.get(v.node) if v.node is not None else None)
                  for v in profile.saved)
    return dataclasses.replace(profile, packs=packs, saved=saved)


def structure_key(sub: fx.GraphModule) -> tuple:
    """What a unit's memory depends on: its ops, how they connect and the placeholders' shapes, not the
    names (block 3 and block 30 differ only in parameter names, so they are measured once)."""
    index = {node: i for i, node in enumerate(sub.graph.nodes)}

    def arg(a):
        if isinstance(a, fx.Node):
            return ("%", index[a])
        if isinstance(a, (list, tuple)):
            return tuple(arg(x) for x in a)
        if isinstance(a, dict):
            return tuple((k, arg(v)) for k, v in a.items())
        return repr(a)

    key = []
    for node in sub.graph.nodes:
        meta = node.meta.get(META_TENSOR)
        shape = (meta.shape, str(meta.dtype)) if meta is not None else None
        target = node.target if node.op in ("call_function", "call_method") else node.op
        key.append((node.op, str(target), arg(node.args), arg(node.kwargs), shape))
    return tuple(key)


def _unit_times(sub: fx.GraphModule, call: UnitCall, key: tuple, profile: UnitProfile, ctx: PassContext,
                times: time_units.TimeCache, room: int, mode: str) -> time_units.UnitTimes | None:
    """Seconds of one distinct unit on the target device: cached, or (``mode`` "measure") measured now when
    its bytes fit."""
    cache_key = time_units.cache_key(ctx.device, time_units.signature(*key))
    cached = times.get(cache_key)
    if cached is not None or mode == "cached":
        return cached
    # What measuring allocates: the unit's placeholders, then at most its own workspace (measured on
    # tensors without data, with the margin real kernels need on CUDA).
    workspace = max(profile.fwd_workspace, profile.grad_fwd_workspace, profile.bwd_workspace)
    need = time_units.placeholder_bytes(sub) + workspace_bound(workspace, ctx.device)
    if need > room:
        log.info("estimate_costs: unit %s (%s) not timed: it takes %s, %s may be used; priced from FLOPs",
                 call.unit, call.name, format_bytes(need), format_bytes(room))
        return None
    start = time.perf_counter()
    try:
        measured = time_units.time_unit(sub, call, ctx.device, trainable=frozenset(
            name for name, train in zip(call.params, key[1]) if train))
    except (RuntimeError, NotImplementedError) as why:   # e.g. out of memory: planning goes on from FLOPs
        log.warning("estimate_costs: unit %s (%s) could not be timed on %s, priced from FLOPs: %s",
                    call.unit, call.name, ctx.device, why)
        return None
    if measured is not None:
        log.debug("estimate_costs: timed unit %s (%s) in %.3f s: fwd %.3g s, grad fwd %.3g s, bwd %.3g s",
                  call.unit, call.name, time.perf_counter() - start, measured.fwd, measured.grad_fwd, measured.bwd)
        times.put(cache_key, measured)
    return measured


@graph_pass(requires=("graph:outlined",), ensures=("analysis:CostModel", "meta:ratel.cost"))
def estimate_costs(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    cache: dict[tuple, tuple[UnitProfile, UnitCall, fx.GraphModule, time_units.UnitTimes | None]] = {}
    mode = time_units.timing_mode(ctx.measure_units, ctx.device)
    times = time_units.TimeCache() if mode != "off" else None
    room = time_units.room(ctx.device, ctx.budget.gpu) if mode == "measure" else 0
    costs = []
    for call_node in gm.graph.nodes:
        call: UnitCall | None = call_node.meta.get(META_UNIT_CALL)
        if call is None:
            continue
        sub = getattr(gm, call.module)
        fwd = bwd = 0
        for node in sub.graph.nodes:
            if node.op == "call_function":
                cost = node_flops(node)
                node.meta[META_COST] = cost
                fwd += cost.fwd_flops
                bwd += cost.bwd_flops
        trainable = frozenset(name for name in call.params if ctx.traced.param(name).trainable)
        key = (structure_key(sub), tuple(name in trainable for name in call.params))
        if key not in cache:
            profile = profile_unit(sub, call, ctx.device, trainable)
            timed = _unit_times(sub, call, key, profile, ctx, times, room, mode) if times is not None else None
            cache[key] = (profile, call, sub, timed)
        profile, measured_call, measured_sub, timed = cache[key]
        if measured_call is not call:   # same structure, other names: rename what the profile refers to
            profile = _rename(profile, measured_call, call, measured_sub, sub)
        param_bytes = sum(ctx.traced.param_nbytes(name) for name in set(call.params))
        costs.append(UnitCost(unit=call.unit, fwd_flops=fwd, bwd_flops=bwd, param_bytes=param_bytes,
                              fwd_workspace=workspace_bound(profile.fwd_workspace, ctx.device),
                              saved_bytes=profile.saved_bytes,
                              bwd_workspace=workspace_bound(profile.bwd_workspace, ctx.device),
                              output_bytes=profile.output_bytes,
                              grad_fwd_workspace=workspace_bound(profile.grad_fwd_workspace, ctx.device),
                              bwd_only_workspace=workspace_bound(profile.bwd_only_workspace, ctx.device),
                              saved=profile.saved, packs=profile.packs,
                              fwd_seconds=timed.fwd if timed else None,
                              grad_fwd_seconds=timed.grad_fwd if timed else None,
                              bwd_seconds=timed.bwd if timed else None))
    if times is not None:
        if times.new:
            time_units.release(ctx.device)
        times.save()
    model = CostModel(units=tuple(costs), total_fwd_flops=sum(c.fwd_flops for c in costs),
                      total_bwd_flops=sum(c.bwd_flops for c in costs))
    return PassResult(gm, modified=False, analysis=model)

