"""estimate_costs: FLOPs per node and per unit, and the GPU bytes each unit's compute needs.

Stages:
  1. FLOPs per node (``node.meta["ratel.cost"] = NodeCost``), for the matrix-class ops that dominate time.
     Counting follows DESIGN.md: a (m×k)·(k×n) product is 2·m·k·n; attention is 4·b·heads·s_q·s_k·d forward
     (causal not halved); backward is 2× forward. Element-wise ops count 0: their cost is memory traffic.
  2. Memory per unit, by running the unit's graph once under FakeTensorMode with a storage-level peak
     tracker (``PeakMemory``; no real allocation, so a 175B plan is made on a laptop): the peak of a no-grad forward
     (``fwd_workspace``), the bytes autograd saves (``saved_bytes``, deduplicated by storage), and the peak
     of recompute + backward (``bwd_workspace``, including parameter and input gradients). Inputs and
     parameters are excluded: the planner accounts for them. Units with the same graph and input shapes
     (the repeated blocks) are measured once.

Before / after: the graph is unchanged; nodes gain ``# flops=...`` in dumps and the ``CostModel`` analysis
holds one ``UnitCost`` per unit.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from ratel.ir import META_COST, META_TENSOR, META_UNIT_CALL, CostModel, NodeCost, UnitCall, UnitCost
from ratel.passes.manager import PassContext, PassResult, graph_pass

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
        else:
            return NodeCost(0, 0)
    except (KeyError, AttributeError, IndexError):
        return NodeCost(0, 0)
    return NodeCost(int(fwd), int(2 * fwd))


def _fake_inputs(mode, metas, device, requires_grad):
    out = []
    for meta in metas:
        if meta is None:
            out.append(None)
            continue
        t = torch.empty(meta.shape, dtype=meta.dtype, device=device)
        if requires_grad and meta.dtype.is_floating_point:
            t.requires_grad_(True)
        out.append(t)
    return out


class PeakMemory(TorchDispatchMode):
    """Peak bytes of tensor storage that ops allocate while active (works on fake tensors).

    Each op's outputs are registered by storage (views share one); after every op, storages nothing holds
    any more are dropped. The peak is read right after an op allocated, before its dead inputs are freed,
    as a caching allocator sees it. Storages that existed before (inputs, parameters) are not counted.
    """

    def __init__(self, preexisting=()):
        super().__init__()
        self.ignore = set(preexisting)
        self.live: dict[StorageWeakRef, int] = {}
        self.current = 0
        self.peak = 0

    def _expire(self) -> None:
        for key in [k for k in self.live if k.expired()]:
            self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._expire()   # what Python dropped since the last op is free before this one allocates
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                key = StorageWeakRef(t.untyped_storage())
                if key not in self.live and key not in self.ignore:
                    self.live[key] = t.untyped_storage().nbytes()
                    self.current += self.live[key]
        self.peak = max(self.peak, self.current)
        self._expire()
        return out


def measure_unit_memory(sub: fx.GraphModule, device: str) -> tuple[int, int, int, int]:
    """(fwd_workspace, saved_bytes, bwd_workspace, output_bytes) of one unit graph, measured on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    metas = [n.meta.get(META_TENSOR) for n in placeholders]
    output_node = next(n for n in sub.graph.nodes if n.op == "output")
    out_metas = [n.meta.get(META_TENSOR) for n in output_node.args[0]]
    output_bytes = sum(m.nbytes for m in out_metas if m is not None)
    fake_device = device if (not device.startswith("cuda") or torch.cuda.is_available()) else "cpu"
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        args = _fake_inputs(mode, metas, fake_device, requires_grad=False)
        args = [a if a is not None else n.meta.get("val") for a, n in zip(args, placeholders)]
        storages = [StorageWeakRef(a.untyped_storage()) for a in args if isinstance(a, torch.Tensor)]
        with torch.no_grad(), PeakMemory(storages) as tracker:
            outs = sub(*args)
            del outs
        fwd_peak = tracker.peak

        grad_args = _fake_inputs(mode, metas, fake_device, requires_grad=True)
        grad_args = [a if a is not None else n.meta.get("val") for a, n in zip(grad_args, placeholders)]
        leaves = [a for a in grad_args if isinstance(a, torch.Tensor) and a.requires_grad]
        input_storages = {StorageWeakRef(a.untyped_storage()) for a in grad_args if isinstance(a, torch.Tensor)}
        saved: dict[StorageWeakRef, int] = {}

        def pack(t):
            key = StorageWeakRef(t.untyped_storage())
            if key not in input_storages:
                saved[key] = t.untyped_storage().nbytes()
            return t

        with PeakMemory(input_storages) as tracker:
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                outs = sub(*grad_args)
            diff = [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]
            if diff and leaves:
                torch.autograd.backward(diff, [torch.ones_like(o) for o in diff], inputs=leaves)
            del outs, diff
        bwd_peak = tracker.peak
    return fwd_peak, sum(saved.values()), bwd_peak, output_bytes


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


@graph_pass(requires=("graph:outlined",), ensures=("analysis:CostModel", "meta:ratel.cost"))
def estimate_costs(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    cache: dict[tuple, tuple[int, int, int, int]] = {}
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
        key = structure_key(sub)
        if key not in cache:
            cache[key] = measure_unit_memory(sub, ctx.device)
        fwd_ws, saved, bwd_ws, out_bytes = cache[key]
        param_bytes = sum(ctx.traced.param_nbytes(name) for name in set(call.params))
        costs.append(UnitCost(unit=call.unit, fwd_flops=fwd, bwd_flops=bwd, param_bytes=param_bytes,
                              fwd_workspace=workspace_bound(fwd_ws, ctx.device),
                              saved_bytes=saved,
                              bwd_workspace=workspace_bound(bwd_ws, ctx.device),
                              output_bytes=out_bytes))
    model = CostModel(units=tuple(costs), total_fwd_flops=sum(c.fwd_flops for c in costs),
                      total_bwd_flops=sum(c.bwd_flops for c in costs))
    return PassResult(gm, modified=False, analysis=model)

