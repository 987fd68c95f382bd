"""One capture for every input shape: the model is exported once with symbolic batch and sequence sizes,
and each new shape gets a static graph from it by substituting the sizes (``SymbolicCapture.concrete``).

A static ``torch.export`` costs 0.2 s for a 2-layer model and 2 s for a 40-layer one on a 2-core CPU, and
an engine met it for every new input shape. Export with ``Dim.AUTO`` sizes records the same ATen ops with
the sizes as symbols, plus the guards under which that graph is the one the model runs (``seq != 2``
where a model slices ``[:, :-1]``, equal numels of ids and labels, sizes >= 2). For a shape meeting every
guard, the graph with the sizes put back as integers is, op for op, the graph a static export of that
shape gives (tested), so it trains bit for bit alike; its ``val`` metadata is rebuilt by running it on
fake tensors. A shape outside the guards (batch 1, a model's special case), or a model export cannot
capture symbolically, is traced as before, statically.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import sympy
import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch.export import Dim
from torch.fx.node import map_aggregate
from torch.multiprocessing.reductions import StorageWeakRef

from ratel.trace import TracedModel, capture, from_export, trace_model

log = logging.getLogger("ratel")

_SYMBOLIC = (torch.SymInt, torch.SymBool, torch.SymFloat)
# Runtime checks export adds for symbolic sizes: evaluated when the sizes are substituted, then dropped
# (a static export has none).
_SIZE_CHECKS = {torch.ops.aten._assert_scalar.default, torch.ops.aten.sym_constrain_range_for_size.default,
                torch.ops.aten.sym_constrain_range.default}


class ShapeOutsideGuards(Exception):
    """This shape is not one the symbolic graph was traced for: trace it statically."""


def _dynamic_shapes(args: tuple, kwargs: dict) -> tuple:
    """Every dimension of every tensor input may vary (export specialises the ones the model fixes)."""
    def spec(value):
        if isinstance(value, torch.Tensor):
            return {d: Dim.AUTO for d in range(value.dim())} or None
        return None
    return tuple(spec(a) for a in args) + tuple(spec(v) for v in kwargs.values())


@dataclass
class SymbolicCapture:
    """A model captured with symbolic input sizes; ``concrete`` gives the static graph of one shape."""

    program: torch.export.ExportedProgram
    shape_env: Any

    @classmethod
    def export(cls, model: nn.Module, args: tuple, kwargs: dict) -> "SymbolicCapture | None":
        """Export ``model`` with symbolic sizes; None when export cannot (the caller traces statically)."""
        try:
            program = capture(model, args, kwargs, dynamic_shapes=_dynamic_shapes(args, kwargs))
        except Exception as exc:  # noqa: BLE001 - any failure means: trace each shape statically, as before
            log.info("ratel: no symbolic-shape capture (%s: %s); each new input shape is traced on its own",
                     type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            return None
        graph = program.graph_module
        if any(n.op in ("call_module", "get_attr") for n in graph.graph.nodes):
            return None      # subgraphs (higher-order ops) carry symbolic sizes of their own
        env = None
        for node in graph.graph.nodes:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and getattr(val, "fake_mode", None) is not None:
                env = val.fake_mode.shape_env
                break
        if env is None:
            return None
        return cls(program, env)

    # ------------------------------------------------------------------ binding sizes
    def bindings(self, flat_inputs: list) -> dict:
        """Symbol -> size for these inputs (flattened user arguments, in export order); raises
        ``ShapeOutsideGuards`` when a size differs from one the graph fixed or a guard fails."""
        placeholders = {n.name: n for n in self.program.graph_module.graph.nodes if n.op == "placeholder"}
        users = [spec.arg.name for spec in self.program.graph_signature.input_specs
                 if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT]
        if len(flat_inputs) != len(users):
            raise ShapeOutsideGuards(f"{len(flat_inputs)} inputs, the capture has {len(users)}")
        binding: dict = {}
        checks = []
        for name, value in zip(users, flat_inputs):
            traced = placeholders[name].meta.get("val")
            if not isinstance(value, torch.Tensor) or not isinstance(traced, torch.Tensor):
                if isinstance(value, torch.Tensor) or isinstance(traced, torch.Tensor):
                    raise ShapeOutsideGuards(f"{name}: a tensor and a value")
                continue    # a non-tensor argument: part of the cache key, so equal
            if traced.dim() != value.dim() or traced.dtype != value.dtype:
                raise ShapeOutsideGuards(f"{name}: rank or dtype differs")
            for size, actual in zip(traced.shape, value.shape):
                expr = size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(size)
                if isinstance(expr, sympy.Symbol):
                    if binding.setdefault(expr, int(actual)) != int(actual):
                        raise ShapeOutsideGuards(f"{expr} is {binding[expr]} and {int(actual)}")
                else:
                    checks.append((expr, int(actual)))
        substitution = {s: sympy.Integer(v) for s, v in binding.items()}
        for expr, actual in checks:
            if expr.xreplace(substitution) != actual:
                raise ShapeOutsideGuards(f"a size {expr} is not {actual}")
        for symbol, value in binding.items():
            bounds = self.shape_env.var_to_range.get(symbol)
            if bounds is not None and not (bounds.lower <= value <= bounds.upper):
                raise ShapeOutsideGuards(f"{symbol}={value} outside {bounds}")
        for guard in self.shape_env.guards:
            if guard.expr.xreplace(substitution) is not sympy.true:
                raise ShapeOutsideGuards(f"guard {guard.expr} fails")
        for asserts in self.shape_env.deferred_runtime_asserts.values():
            for ra in asserts:
                if ra.expr.xreplace(substitution) is not sympy.true:
                    raise ShapeOutsideGuards(f"assertion {ra.expr} fails")
        return substitution

    # ------------------------------------------------------------------ the static graph
    def concrete(self, flat_inputs: list) -> fx.GraphModule:
        """The graph of this shape with integer sizes and fresh ``val`` metadata."""
        substitution = self.bindings(flat_inputs)
        source = self.program.graph_module
        graph = fx.Graph()
        mapping: dict[fx.Node, Any] = {}
        sizes: dict[Any, Any] = {}      # a symbolic expression -> its value, shared by the repeated blocks

        def size_of(sym):
            expr = sym.node.expr
            value = sizes.get(expr)
            if value is None:
                value = expr.xreplace(substitution)
                if value.free_symbols:
                    raise ShapeOutsideGuards(f"{expr} depends on values, not only on sizes")
                value = bool(value) if isinstance(sym, torch.SymBool) else (
                    float(value) if isinstance(sym, torch.SymFloat) else int(value))
                sizes[expr] = value
            return value

        def mapped(a):
            return mapping[a] if isinstance(a, fx.Node) else a

        sizes_of: dict[fx.Node, tuple | None] = {}     # the concrete shape of each new tensor node
        origin: dict[fx.Node, fx.Node] = {}             # new node -> the symbolic node it stands for
        run: _IndexRun | None = None

        def close_run():
            nonlocal run
            if run.all_folded:
                alias = graph.create_node("call_function", torch.ops.aten.alias.default, (run.input,), {},
                                          name="alias")
                alias.meta = {k: v for k, v in run.last.meta.items() if k not in ("val", "tensor_meta")}
                mapping[run.last] = alias
                origin[alias] = run.last
                sizes_of[alias] = sizes_of.get(run.input)
            run = None

        for node in source.graph.nodes:
            val = node.meta.get("val")
            if node.op == "call_function" and node.target in _SIZE_CHECKS:
                condition = map_aggregate(node.args, mapped)[0] if node.args else True
                if node.target is torch.ops.aten._assert_scalar.default and condition is not True:
                    raise ShapeOutsideGuards(f"{node.name} fails")
                continue
            if isinstance(val, _SYMBOLIC):
                mapping[node] = size_of(val)
                continue
            if node.op == "call_function" and any(isinstance(v, _SYMBOLIC) for v in pytree.tree_leaves(val)):
                raise ShapeOutsideGuards(f"{node.name} returns sizes in a container")
            if run is not None and not _continues(node, run):
                close_run()
            if node.op == "output":
                graph.output(map_aggregate(node.args[0], mapped))
                continue
            args, kwargs = map_aggregate((node.args, node.kwargs), mapped)
            # Static export records no op for a whole-dimension slice of an index expression (x[:, :-1]
            # over dim 0), and ``alias`` for an expression of nothing else (x[:, 0:]).
            folded = _full_slice(node, args, sizes_of)
            if node.op == "call_function" and node.target in _INDEXING_VIEWS:
                run = run or _IndexRun(input=args[0], stack=node.meta.get("stack_trace"))
                run.last = node
                run.all_folded &= folded
            if folded:
                mapping[node] = args[0]
                continue
            # Unnamed: fx names it as export named the static graph's node (the same ops in the same order).
            new = graph.create_node(node.op, node.target, args, kwargs, name=_name_candidate(node),
                                    type_expr=node.type)
            new.meta = {k: v for k, v in node.meta.items() if k not in ("val", "tensor_meta")}
            mapping[node] = new
            origin[new] = node
            sizes_of[new] = _concrete_shape(val, size_of)
        gm = fx.GraphModule(source, graph)
        _propagate_fakes(gm, source, flat_inputs, self.program, origin, size_of)
        return gm

    def traced(self, model: nn.Module, flat_inputs: list, split_blocks: bool) -> TracedModel:
        return from_export(self.program, self.concrete(flat_inputs), model, split_blocks)


# Views an index expression (``x[:, None, 1:]``) records, one per indexed dimension.
_INDEXING_VIEWS = {torch.ops.aten.slice.Tensor, torch.ops.aten.unsqueeze.default, torch.ops.aten.select.int}


@dataclass
class _IndexRun:
    """Consecutive views of one index expression."""

    input: Any                       # the expression's operand in the new graph
    stack: str | None
    last: fx.Node | None = None      # its latest view, in the symbolic graph
    all_folded: bool = True          # every view so far was a whole-dimension slice


def _continues(node: fx.Node, run: _IndexRun) -> bool:
    return (node.op == "call_function" and node.target in _INDEXING_VIEWS and bool(node.args)
            and node.args[0] is run.last and node.meta.get("stack_trace") == run.stack)


def _name_candidate(node: fx.Node) -> str:
    """The name without export's deduplicating suffix (``linear_8`` -> ``linear``): fx numbers it again, as
    export numbered the static graph's node (the same ops in the same order, less the dropped ones)."""
    if node.op == "placeholder":
        return node.name
    return re.sub(r"_\d+$", "", node.name)


def _concrete(size, size_of) -> int:
    return size_of(size) if isinstance(size, torch.SymInt) else int(size)


def _concrete_shape(val, size_of) -> tuple | None:
    if not isinstance(val, torch.Tensor):
        return None
    return tuple(_concrete(s, size_of) for s in val.shape)


def _full_slice(node: fx.Node, args: tuple, sizes_of: dict) -> bool:
    """``aten.slice`` over a whole dimension with step 1: a no-op that only a symbolic size kept."""
    if node.target is not torch.ops.aten.slice.Tensor or not isinstance(args[0], fx.Node):
        return False
    shape = sizes_of.get(args[0])
    if shape is None:
        return False
    dim, start, end, step = (list(args[1:]) + [0, None, None, 1][len(args) - 1:])[:4]
    if dim < 0:
        dim += len(shape)
    return (start in (0, None)) and (end is None or end >= shape[dim]) and step == 1


def _propagate_fakes(gm: fx.GraphModule, source: fx.GraphModule, flat_inputs: list, program,
                     origin: dict, size_of) -> None:
    """``meta["val"]`` of every node, aliasing included (annotate_shapes reads views from shared storages).

    An op's value is its symbolic value with the sizes put in: a fake tensor of the concrete shape, strides
    and offset, on a storage of the concrete size shared as the symbolic values share theirs — a few times
    cheaper than running the op on fake tensors, which a new shape makes miss fake tensors' cache. A value
    that cannot be rebuilt so (a storage viewed at another dtype) is computed by running its op."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    originals = {n.name: n.meta.get("val") for n in source.graph.nodes if n.op == "placeholder"}
    user_names = [spec.arg.name for spec in program.graph_signature.input_specs
                  if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    user_values = dict(zip(user_names, flat_inputs))
    storages: dict[StorageWeakRef, torch.Tensor] = {}    # symbolic storage -> a concrete tensor on its twin

    def rebuilt(symbolic: torch.Tensor) -> torch.Tensor | None:
        key = StorageWeakRef(symbolic.untyped_storage())
        base = storages.get(key)
        if base is None:
            base = torch.empty(_concrete(symbolic.untyped_storage().nbytes(), size_of) // symbolic.element_size(),
                               dtype=symbolic.dtype, device=symbolic.device)
            storages[key] = base
        elif base.dtype != symbolic.dtype:
            return None
        return base.as_strided(_concrete_shape(symbolic, size_of),
                               tuple(_concrete(d, size_of) for d in symbolic.stride()),
                               _concrete(symbolic.storage_offset(), size_of))

    # No autograd: export's metadata carries no requires_grad on computed values.
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
        env: dict[fx.Node, Any] = {}
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                old = originals[node.name]
                real = user_values.get(node.name)
                if isinstance(real, torch.Tensor):
                    val = torch.empty_strided(real.shape, real.stride(), dtype=real.dtype, device=old.device)
                elif isinstance(old, torch.Tensor):
                    shared = rebuilt(old) if StorageWeakRef(old.untyped_storage()) in storages else None
                    val = shared if shared is not None else torch.empty_strided(
                        tuple(int(s) for s in old.shape), tuple(int(s) for s in old.stride()), dtype=old.dtype,
                        device=old.device)
                    if old.requires_grad:
                        val.requires_grad_(True)
                else:
                    val = old
                if isinstance(old, torch.Tensor) and isinstance(val, torch.Tensor):   # tied weights share one
                    storages.setdefault(StorageWeakRef(old.untyped_storage()), val.detach().as_strided(
                        (val.untyped_storage().nbytes() // val.element_size(),), (1,), 0))
            elif node.op == "call_function":
                symbolic = origin[node].meta.get("val")
                leaves, spec = pytree.tree_flatten(symbolic)
                built = [rebuilt(t) if isinstance(t, torch.Tensor) else
                         (size_of(t) if isinstance(t, _SYMBOLIC) else t) for t in leaves]
                if symbolic is None or any(b is None for b, t in zip(built, leaves) if isinstance(t, torch.Tensor)):
                    args, kwargs = map_aggregate((node.args, node.kwargs),
                                                 lambda a: env[a] if isinstance(a, fx.Node) else a)
                    val = node.target(*args, **kwargs)
                else:
                    val = pytree.tree_unflatten(built, spec)
            elif node.op == "output":
                continue
            else:
                raise ShapeOutsideGuards(f"unexpected node {node.op}")
            env[node] = val
            node.meta["val"] = val
    del mode


class TraceCache:
    """Captures of one model, by call signature (training mode, argument structure, ranks, dtypes,
    non-tensor values). The first shape of a signature is traced statically, as a single-shape run needs
    nothing more; the second exports symbolically (slower than a static export: 1.5x on a 40-layer GPT),
    and from then on a new shape only substitutes its sizes."""

    def __init__(self):
        self._first_shape: dict[tuple, tuple] = {}
        self._captures: dict[tuple, SymbolicCapture | None] = {}
        self.symbolic_hits = 0      # shapes whose graph came from a symbolic capture
        self.static_traces = 0      # shapes traced by a static export

    @staticmethod
    def signature(model: nn.Module, flat: list, spec) -> tuple:
        inputs = tuple((x.dim(), x.dtype, str(x.device)) if isinstance(x, torch.Tensor) else ("value", repr(x))
                       for x in flat)
        grads = tuple(p.requires_grad for p in model.parameters())
        return (model.training, str(spec), inputs, grads)

    def trace(self, model: nn.Module, args: tuple, kwargs: dict, split_blocks: bool) -> TracedModel:
        """``trace_model(model, args, kwargs, split_blocks)``, from the model's symbolic capture when this
        shape meets its guards."""
        flat, spec = pytree.tree_flatten((args, kwargs))
        key = self.signature(model, flat, spec)
        shape = tuple(tuple(x.shape) for x in flat if isinstance(x, torch.Tensor))
        if key not in self._captures and self._first_shape.setdefault(key, shape) != shape:
            self._captures[key] = SymbolicCapture.export(model, args, kwargs)
        symbolic = self._captures.get(key)
        if symbolic is not None:
            try:
                traced = symbolic.traced(model, flat, split_blocks)
                self.symbolic_hits += 1
                return traced
            except ShapeOutsideGuards as why:
                log.info("ratel: shape %s traced statically: %s", list(shape), why)
        self.static_traces += 1
        return trace_model(model, args, kwargs, split_blocks=split_blocks)
