"""canonicalize_graph: make the captured graph runnable on the target device.

Stages:
  1. Drop ``aten._assert_tensor_metadata`` checks: export records the trace device in them (``meta`` when the
     model was created on the meta device), so they would fail on the real device while checking nothing
     the runtime does not already guarantee.
  2. Retarget device arguments: every ``device=<trace device>`` becomes ``device=<target device>``
     (``arange``, ``new_ones``, ``to.device`` ...), so a model traced on ``meta`` runs on CUDA or CPU.

Before / after (traced on meta, target cpu)::

    _assert_tensor_metadata_default = aten._assert_tensor_metadata.default(add, dtype=torch.float32, device=meta)
    arange = aten.arange.default(16, device=meta, pin_memory=False)
  ->
    arange = aten.arange.default(16, device=cpu, pin_memory=False)
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ratel.passes.manager import PassContext, PassResult, graph_pass

_ASSERTS = {torch.ops.aten._assert_tensor_metadata.default}


def _retarget(value, source: torch.device, target: torch.device):
    if isinstance(value, torch.device):
        return target if value == source else value
    if isinstance(value, (list, tuple)):
        return type(value)(_retarget(v, source, target) for v in value)
    if isinstance(value, dict):
        return {k: _retarget(v, source, target) for k, v in value.items()}
    return value


@graph_pass(requires=("meta:ratel.unit",), ensures=("graph:canonical",))
def canonicalize_graph(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    source = torch.device(ctx.traced.trace_device)
    target = torch.device(ctx.device)
    modified = False
    graphs = [m for m in gm.modules() if isinstance(m, fx.GraphModule)]   # bodies of higher-order ops too
    for module in graphs:
        modified |= canonicalize(module, source, target)
    return PassResult(gm, modified)


def canonicalize(gm: fx.GraphModule, source: torch.device, target: torch.device) -> bool:
    modified = False
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _ASSERTS and not node.users:
            gm.graph.erase_node(node)
            modified = True
            continue
        if source != target and node.op == "call_function":
            args, kwargs = _retarget(node.args, source, target), _retarget(node.kwargs, source, target)
            if args != node.args or kwargs != node.kwargs:
                node.args, node.kwargs = args, kwargs
                modified = True
    if modified:
        gm.recompile()
    return modified
