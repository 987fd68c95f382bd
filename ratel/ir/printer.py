"""The text dump of a graph: Ratel's main debugging view.

Each node prints as one Python-like line with its shape and dtype inline and its Ratel records as a
trailing comment (unit, placement, transfer, FLOPs), e.g.::

    linear: "f32[2, 16, 192]" = aten.linear.default(ln_1, p_blocks_0_attn_qkv_weight, p_...)  # unit=blocks.0 flops=393216

Outlined units print after the top-level graph, in forward order. The output is deterministic: the same
graph and records give the same text byte for byte, so dumps can be diffed between runs.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ratel.ir import (META_ACTIVATION, META_COST, META_PROVENANCE, META_TENSOR, META_TRANSFER, META_UNIT,
                      META_UNIT_CALL, dtype_abbr, format_bytes)


def _format_arg(arg) -> str:
    if isinstance(arg, fx.Node):
        return arg.name
    if isinstance(arg, tuple):
        inner = ", ".join(_format_arg(a) for a in arg)
        return f"({inner},)" if len(arg) == 1 else f"({inner})"
    if isinstance(arg, list):
        return "[" + ", ".join(_format_arg(a) for a in arg) + "]"
    if isinstance(arg, dict):
        return "{" + ", ".join(f"{k!r}: {_format_arg(v)}" for k, v in arg.items()) + "}"
    if isinstance(arg, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return str(arg)
    return repr(arg)


def _target_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._schema.name.split('::')[-1]}.{target._overloadname}"
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"higher_order.{target.name()}"
    if node.op == "call_module":
        return f"self.{target}"
    if node.op == "call_method":
        return f".{target}"
    module = getattr(target, "__module__", "") or ""
    name = getattr(target, "__name__", str(target))
    if module.startswith("ratel."):
        return f"ratel.{name}"
    if module in ("_operator", "operator"):
        return f"operator.{name}"
    return f"{module}.{name}" if module else name


def _annotation(node: fx.Node) -> str:
    record = node.meta.get(META_TENSOR)
    if record is not None:
        return record.short()
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return f"{dtype_abbr(val.dtype)}[{', '.join(str(s) for s in val.shape)}]"
    if isinstance(val, (tuple, list)) and val and all(isinstance(v, torch.Tensor) for v in val):
        return f"tuple[{len(val)}]"
    return ""


def _comment(node: fx.Node) -> str:
    parts = []
    if META_UNIT in node.meta:
        parts.append(f"unit={node.meta[META_UNIT]}")
    cost = node.meta.get(META_COST)
    if cost is not None and cost.fwd_flops:
        parts.append(f"flops={cost.fwd_flops}")
    act = node.meta.get(META_ACTIVATION)
    if act is not None:
        parts.append(f"activation={act.tier} ({format_bytes(act.nbytes)}, {act.reason})")
    transfer = node.meta.get(META_TRANSFER)
    if transfer is not None:
        where = f"{transfer.src}->{transfer.dst}" if transfer.src and transfer.dst else ""
        slot = f" slot={transfer.slot}" if transfer.slot is not None else ""
        parts.append(f"{transfer.kind} {where} {format_bytes(transfer.nbytes)} step={transfer.step}"
                     f" needed_by={transfer.needed_by}{slot}".replace("  ", " "))
    prov = node.meta.get(META_PROVENANCE)
    if prov is not None:
        parts.append(f"by {prov.pass_name}")
    return ("  # " + "; ".join(parts)) if parts else ""


def format_graph_body(graph: fx.Graph, name: str = "forward") -> str:
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    params = ", ".join(f'{n.name}: "{_annotation(n)}"' if _annotation(n) else n.name for n in placeholders)
    lines = [f"def {name}(self, {params}):" if params else f"def {name}(self):"]
    for node in graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            lines.append(f"    return {_format_arg(node.args[0])}")
            continue
        if node.op == "get_attr":
            rhs = f"self.{node.target}"
        elif node.op == "call_function" and getattr(node.target, "__name__", "") == "getitem":
            rhs = f"{_format_arg(node.args[0])}[{_format_arg(node.args[1])}]"
        elif node.op == "call_method":
            rhs = f"{_format_arg(node.args[0])}.{node.target}({', '.join(_format_arg(a) for a in node.args[1:])})"
        else:
            args = [_format_arg(a) for a in node.args]
            args += [f"{k}={_format_arg(v)}" for k, v in node.kwargs.items()]
            rhs = f"{_target_name(node)}({', '.join(args)})"
        ann = _annotation(node)
        lhs = f'{node.name}: "{ann}"' if ann else node.name
        lines.append(f"    {lhs} = {rhs}{_comment(node)}")
    return "\n".join(lines) + "\n"


def format_graph(gm: fx.GraphModule) -> str:
    """The whole program: the top-level graph, then each outlined unit graph in the order it is called, then
    the bodies of higher-order ops (``self.submod_N``)."""
    out = ["# top-level graph", format_graph_body(gm.graph)]
    for node in gm.graph.nodes:
        call = node.meta.get(META_UNIT_CALL)
        if call is not None:
            sub = getattr(gm, call.module)
            out.append(f"# unit {call.name} (self.{call.module}): reads {len(call.params)} parameters, "
                       f"{len(call.buffers)} buffers")
            out.append(format_graph_body(sub.graph))
            out.extend(_bodies(sub, f"self.{call.module}"))
    out.extend(_bodies(gm, "self"))
    return "\n".join(out)


def _bodies(gm: fx.GraphModule, owner: str) -> list[str]:
    out = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            body = getattr(gm, node.target, None)
            if isinstance(body, fx.GraphModule):
                out.append(f"# {owner}.{node.target}")
                out.append(format_graph_body(body.graph))
    return out
