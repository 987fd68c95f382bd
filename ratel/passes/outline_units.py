"""outline_units: move each unit's nodes into a graph of its own, called from a top-level schedule.

Stages:
  1. Collect each unit's member nodes (``node.meta["ratel.unit"]``) and its external reads, split by kind:
     activations (values of other units or user inputs), parameters and buffers (export placeholders).
  2. Build one GraphModule per unit: placeholders ``(*activations, *parameters, *buffers)``, the member
     nodes copied in order, and an output of every value read outside the unit.
  3. Build the top-level graph: a ``runtime`` placeholder, the user inputs, one ``ratel.run_unit`` call per
     unit in forward order (recorded as ``UnitCall`` under ``node.meta["ratel.unit_call"]``) and one
     ``getitem`` per boundary value, named as the value was in the flat graph.

Parameters leave the top-level graph: the runtime supplies them (from a GPU ring slot), which is what lets
later passes decide where they live.

Before / after::

    embedding = aten.embedding.default(p_wte_weight, input_ids)        # unit=embed
    layer_norm = aten.layer_norm.default(embedding, [32], p_ln_w, ...)  # unit=blocks.0
  ->
    unit_embed = ratel.run_unit(runtime, 'embed', input_ids)
    embedding = unit_embed[0]
    unit_blocks_0 = ratel.run_unit(runtime, 'blocks.0', embedding)
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ratel.errors import NodeError
from ratel.ir import META_PROVENANCE, META_TENSOR, META_UNIT, META_UNIT_CALL, Provenance, UnitCall
from ratel.passes.manager import PassContext, PassResult, graph_pass
from ratel.ir.ops import run_unit


def unit_attr(name: str) -> str:
    """Attribute name of a unit's GraphModule: 'model.layers.3' -> 'unit_model_layers_3'."""
    return "unit_" + "".join(c if c.isalnum() else "_" for c in name)


def _copy_meta(src: fx.Node, dst: fx.Node) -> None:
    for key in ("val", "tensor_meta", META_TENSOR, META_UNIT, "nn_module_stack", "stack_trace"):
        if key in src.meta:
            dst.meta[key] = src.meta[key]


@graph_pass(requires=("meta:ratel.tensor",), ensures=("graph:outlined", "meta:ratel.unit_call"))
def outline_units(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    traced = ctx.traced
    param_of = dict(traced.params)
    buffer_of = dict(traced.buffers)
    user_inputs = set(traced.user_inputs)

    members: dict[str, list[fx.Node]] = {u.name: [] for u in traced.units}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        unit = node.meta.get(META_UNIT)
        if unit not in members:
            raise NodeError(node, f"node has no known unit (meta {META_UNIT}={unit!r})")
        members[unit].append(node)

    top = fx.Graph()
    runtime = top.placeholder("runtime")
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            env[node] = top.placeholder(node.name)
            _copy_meta(node, env[node])

    unit_modules: dict[str, fx.GraphModule] = {}
    for unit in traced.units:
        nodes = members[unit.name]
        inside = set(nodes)
        acts: list[fx.Node] = []
        params: list[fx.Node] = []
        buffers: list[fx.Node] = []
        for node in nodes:
            for inp in node.all_input_nodes:
                if inp in inside:
                    continue
                if inp.op == "placeholder" and inp.name in param_of:
                    bucket = params
                elif inp.op == "placeholder" and inp.name in buffer_of:
                    bucket = buffers
                else:
                    bucket = acts
                if inp not in bucket:
                    bucket.append(inp)
        outputs = [n for n in nodes if any(user not in inside for user in n.users)]

        sub = fx.Graph()
        sub_env: dict[fx.Node, fx.Node] = {}
        for ext in acts + params + buffers:
            sub_env[ext] = sub.placeholder(ext.name)
            _copy_meta(ext, sub_env[ext])
        for node in nodes:
            sub_env[node] = sub.node_copy(node, lambda n: sub_env[n])
        sub.output(tuple(sub_env[n] for n in outputs))
        attr = unit_attr(unit.name)
        # Rooted at the flat graph's module: submodules of higher-order ops (get_attr targets such as the
        # body of a wrap_with_autocast) are copied along.
        unit_modules[attr] = fx.GraphModule(gm, sub, class_name=attr)

        missing = [a for a in acts if a not in env]
        if missing:
            raise NodeError(missing[0], f"unit {unit.name} reads a value no earlier unit produces")
        call = top.create_node("call_function", run_unit, (runtime, unit.name, *[env[a] for a in acts]),
                               name=attr)
        call.meta[META_UNIT_CALL] = UnitCall(
            unit=unit.index, name=unit.name, module=attr, inputs=tuple(a.name for a in acts),
            params=tuple(param_of[p.name] for p in params), buffers=tuple(buffer_of[b.name] for b in buffers),
            outputs=tuple(o.name for o in outputs))
        call.meta[META_PROVENANCE] = Provenance("outline_units", "call unit")
        for index, out in enumerate(outputs):
            value = top.create_node("call_function", operator.getitem, (call, index), name=out.name)
            _copy_meta(out, value)
            env[out] = value

    output = next(n for n in gm.graph.nodes if n.op == "output")
    top.output(fx.node.map_arg(output.args[0], lambda n: env[n]))
    new_gm = fx.GraphModule(torch.nn.Module(), top, class_name="RatelProgram")
    for attr, module in unit_modules.items():   # called through run_unit, so fx would not copy them itself
        new_gm.add_module(attr, module)
    return PassResult(new_gm, modified=True)
