"""Graph capture and unit discovery.

Capture: ``torch.export.export(..., strict=False)`` in the model's current train/eval mode. Plain
``torch.fx.symbolic_trace`` fails on every transformers 5 causal LM tried, while non-strict export captures
them (dropout included, on the meta device too) and records ``nn_module_stack`` on every node, which is what
unit discovery reads. Parameters come out as graph placeholders, so the runtime can feed any tensor (a slot
of the GPU parameter ring) in their place.

Units: the repeated blocks are the members of the largest ``nn.ModuleList`` whose members share one
structure. Every node is tagged ``node.meta["ratel.unit"]``: nodes inside block ``i`` belong to it, nodes
before the first block to the unit "embed", nodes after the last to "head", and the few nodes that belong to
no module but sit between blocks to the block before them.
"""
from __future__ import annotations

import contextlib
import inspect
import linecache
import math
import re
import sys
import threading
import traceback
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from ratel.errors import TraceError
from ratel.ir import META_UNIT, Unit, canonical_parameter_names

PRE_UNIT = "embed"
POST_UNIT = "head"


@dataclass(frozen=True)
class ParamInfo:
    name: str                      # canonical name (the first of tied aliases)
    shape: tuple[int, ...]
    dtype: torch.dtype
    trainable: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class TracedModel:
    """A captured model: its graph, how user arguments map onto placeholders, and its units."""

    gm: fx.GraphModule
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    params: tuple[tuple[str, str], ...]     # placeholder name -> canonical parameter name
    buffers: tuple[tuple[str, str], ...]    # placeholder name -> buffer / lifted constant name
    constants: tuple[tuple[str, Any], ...]  # lifted constant name -> value (tensor constants of the program)
    user_inputs: tuple[str, ...]            # placeholder names fed from the user's (flattened) arguments
    param_info: tuple[ParamInfo, ...]       # every parameter the graph reads, canonical names, export order
    units: tuple[Unit, ...]
    block_path: str | None
    trace_device: str
    split_blocks: bool = False               # each block is two units (see block_cut)

    def param(self, name: str) -> ParamInfo:
        return self._param_index()[name]

    def param_nbytes(self, name: str) -> int:
        return self.param(name).nbytes

    def _param_index(self) -> dict[str, ParamInfo]:
        index = self.__dict__.get("_index")
        if index is None:
            index = {p.name: p for p in self.param_info}
            object.__setattr__(self, "_index", index)
        return index


def _structure(module: nn.Module) -> tuple:
    return (type(module).__qualname__,
            tuple((n, tuple(p.shape), p.dtype) for n, p in module.named_parameters()))


def find_block_list(model: nn.Module) -> str | None:
    """Path of the largest ModuleList whose members all have one structure (the transformer blocks)."""
    best: tuple[int, str] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2:
            if len({_structure(child) for child in module}) == 1:
                numel = sum(p.numel() for p in module.parameters())
                if best is None or numel > best[0]:
                    best = (numel, name)
    return None if best is None else best[1]


def _model_device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _trace_arg(value: Any, device: torch.device) -> Any:
    # A fresh tensor per argument: export would otherwise specialise on arguments that alias (labels=input_ids
    # in an example call) and read one placeholder for both.
    if isinstance(value, torch.Tensor):
        return torch.zeros_like(value, device=device)
    return value


def _failing_frame(exc: BaseException, model: nn.Module) -> str:
    """The deepest frame of model code (not torch's) in the traceback, with the module it belongs to."""
    module_names = {id(m): n or "<root>" for n, m in model.named_modules()}
    torch_dir = torch.__file__.rsplit("/", 1)[0]
    chosen = None
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        filename = frame.f_code.co_filename
        if filename.startswith(torch_dir) or filename.startswith(sys.prefix + "/lib/python") and "site-packages" not in filename:
            continue
        if filename.endswith("ratel/trace.py") or frame.f_code.co_name == "__torch_dispatch__":
            continue     # (a dispatch mode around the call, such as checked lanes' ComputeAccesses, is no model code)
        chosen = (frame, lineno)
    if chosen is None:
        return "  (no frame of model code in the traceback)"
    frame, lineno = chosen
    owner = frame.f_locals.get("self")
    where = ""
    if isinstance(owner, nn.Module):
        where = f" in module '{module_names.get(id(owner), '?')}' ({type(owner).__name__})"
    code = linecache.getline(frame.f_code.co_filename, lineno).strip()
    return f'  File "{frame.f_code.co_filename}", line {lineno}, in {frame.f_code.co_name}{where}\n    {code}'


_CAPTURE = threading.local()


def capturing() -> bool:
    """Whether this thread is inside ``capture`` (model hooks that refuse direct use let export through)."""
    return getattr(_CAPTURE, "depth", 0) > 0


def tracing() -> bool:
    """Whether tensor work on this thread would be recorded into a graph or faked rather than run: inside
    ``capture``, or under a fake, proxy or functional mode (export's, or a pass's shape propagation)."""
    if capturing():
        return True
    return any(torch._C._get_dispatch_mode(key) is not None
               for key in torch._C._TorchDispatchModeKey.__members__.values())


def after_tracing(action) -> None:
    """Run ``action`` now, or, while this thread is ``tracing``, once it no longer is (at the end of the
    outermost capture, or at ``run_after_tracing``). For finalizers: a garbage-collected engine that copies its
    weights back into the model while export traces another model puts those copies into that graph."""
    if not tracing():
        action()
        return
    pending = getattr(_CAPTURE, "after", None)
    if pending is None:
        pending = _CAPTURE.after = []
    pending.append(action)


def run_after_tracing() -> None:
    """Run what ``after_tracing`` held back on this thread, if it is no longer tracing."""
    pending = getattr(_CAPTURE, "after", None)
    while pending and not tracing():
        pending.pop(0)()


@contextlib.contextmanager
def _capturing():
    _CAPTURE.depth = getattr(_CAPTURE, "depth", 0) + 1
    try:
        yield
    finally:
        _CAPTURE.depth -= 1
        run_after_tracing()


def capture(model: nn.Module, args: tuple, kwargs: dict[str, Any],
            dynamic_shapes: tuple | None = None) -> torch.export.ExportedProgram:
    """torch.export the model as it is called for training; a failure names the module and the line.
    ``dynamic_shapes`` (export's, one entry per argument then per keyword): sizes traced as symbols."""
    device = _model_device(model)
    args = tuple(_trace_arg(a, device) for a in args)
    kwargs = {k: _trace_arg(v, device) for k, v in kwargs.items()}
    try:
        with _capturing():
            return torch.export.export(model, args, kwargs=kwargs, strict=False, dynamic_shapes=dynamic_shapes)
    except Exception as exc:  # noqa: BLE001 - re-raised with the location the user needs
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if re.search(r"scalar type|dtype|Expected tensor|shape|size mismatch|must match", message):
            advice = ("the inputs do not fit the model: check their dtype and shape against a plain PyTorch call "
                      "(token ids are integer tensors of shape (batch, sequence))")
        else:
            advice = ("make this line traceable (no data-dependent Python control flow on tensor values, no "
                      ".item()/.tolist() in forward), or pass inputs of the form used in training")
        error = TraceError(
            f"Ratel could not capture {type(model).__name__} as a graph (torch.export, non-strict).\n"
            f"The failing line:\n{_failing_frame(exc, model)}\n"
            f"Cause: {type(exc).__name__}: {message}\n"
            f"What to change: {advice}.")
        # The message holds what the user needs; export's own chain of tracebacks runs to hundreds of lines
        # of torch internals, so it is kept on the error (``error.original``) but not printed.
        error.original = exc
        raise error from None


_BLOCK_RE_CACHE: dict[str, re.Pattern] = {}


def _block_index(node: fx.Node, block_path: str) -> int | None:
    pattern = _BLOCK_RE_CACHE.setdefault(block_path, re.compile(rf"^{re.escape(block_path)}\.(\d+)(?:[.@]|$)"))
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in stack.values():
        match = pattern.match(path)
        if match:
            return int(match.group(1))
    return None


def is_random(node: fx.Node) -> bool:
    """Whether the op draws random numbers (so the recomputed forward must replay the RNG)."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return False
    name = target.name()
    if target is torch.ops.aten.scaled_dot_product_attention.default:
        p = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
        return bool(p)
    if "dropout" in name:   # p = 0 draws no random numbers
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
        return not (isinstance(p, (int, float)) and p == 0)
    if torch.Tag.nondeterministic_seeded in target.tags:
        return True
    return any(word in name for word in ("bernoulli", "rand", "normal", "multinomial"))


def _storages(node: fx.Node) -> dict[int, int]:
    """The storages a node's value holds (a tuple's too), by identity -> bytes."""
    return {t.untyped_storage()._cdata: t.untyped_storage().nbytes()
            for t in pytree.tree_leaves(node.meta.get("val")) if isinstance(t, torch.Tensor)}


def block_cut(members: list[fx.Node], param_of: dict[str, str]) -> int | None:
    """Where to cut a block in two: the position (a node index in ``members``) with parameters on both sides
    whose crossing values take the fewest bytes — values made before it and read at or after it (or after
    the block), and the block's inputs still read after it; in a transformer block, the residual stream after
    attention. Ties go to the most even split of parameter bytes. None when no cut leaves parameters on both
    sides."""
    def params_read(node):
        return [p for p in node.all_input_nodes if p.op == "placeholder" and p.name in param_of]

    param_bytes = [sum(sum(_storages(p).values()) for p in params_read(n)) for n in members]
    total = sum(param_bytes)
    position = {n: i for i, n in enumerate(members)}
    # Activations from outside the block (its inputs): the last member reading each.
    external: dict[fx.Node, int] = {}
    for i, n in enumerate(members):
        for a in n.all_input_nodes:
            if a not in position and not (a.op == "placeholder" and a.name in param_of) and a.op != "get_attr":
                external[a] = i
    best = None
    before_params = 0
    for cut in range(1, len(members)):
        before_params += param_bytes[cut - 1]
        if before_params == 0 or before_params == total:
            continue
        crossing: dict[int, int] = {}
        for n in members[:cut]:
            if any(position.get(u, len(members)) >= cut for u in n.users):
                crossing.update(_storages(n))
        for a, last in external.items():
            if last >= cut:
                crossing.update(_storages(a))
        key = (sum(crossing.values()), abs(2 * before_params - total))
        if best is None or key < best[0]:
            best = (key, cut)
    return None if best is None else best[1]


def discover_units(gm: fx.GraphModule, block_path: str | None, num_blocks: int,
                   param_of: dict[str, str], buffer_of: dict[str, str],
                   split_blocks: bool = False) -> tuple[Unit, ...]:
    """Tag every compute node with its unit name and describe the units in forward order. With
    ``split_blocks`` each block becomes two units, ``<block>:0`` and ``<block>:1``, cut by ``block_cut``."""
    compute = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    explicit = {n: _block_index(n, block_path) for n in compute} if block_path else {n: None for n in compute}
    positions = [i for i, n in enumerate(compute) if explicit[n] is not None]
    names = [f"{block_path}.{i}" for i in range(num_blocks)] if block_path else []
    assignment: dict[fx.Node, str] = {}
    current = None
    for pos, node in enumerate(compute):
        block = explicit[node]
        if block is not None:
            current = names[block]
            assignment[node] = current
        elif not positions or pos < positions[0]:
            assignment[node] = PRE_UNIT
        elif pos > positions[-1]:
            assignment[node] = POST_UNIT
        else:
            assignment[node] = current
    if split_blocks:
        halves = []
        for name in names:
            members = [n for n in compute if assignment[n] == name]
            cut = block_cut(members, param_of)
            if cut is None:
                halves.append(name)
                continue
            for i, node in enumerate(members):
                assignment[node] = f"{name}:{0 if i < cut else 1}"
            halves += [f"{name}:0", f"{name}:1"]
        names = halves
    for node, unit in assignment.items():
        node.meta[META_UNIT] = unit

    order = [PRE_UNIT] + [n for n in names if n in set(assignment.values())] + [POST_UNIT]
    order = [u for u in order if u in set(assignment.values())]
    units = []
    for index, name in enumerate(order):
        members = [n for n in compute if assignment[n] == name]
        params: list[str] = []
        buffers: list[str] = []
        for node in members:
            for inp in node.all_input_nodes:
                if inp.op != "placeholder":
                    continue
                if inp.name in param_of and param_of[inp.name] not in params:
                    params.append(param_of[inp.name])
                elif inp.name in buffer_of and buffer_of[inp.name] not in buffers:
                    buffers.append(buffer_of[inp.name])
        kind = "pre" if name == PRE_UNIT else "post" if name == POST_UNIT else "block"
        units.append(Unit(index=index, name=name, kind=kind, params=tuple(params), buffers=tuple(buffers),
                          has_random_ops=any(is_random(n) for n in members)))
    return tuple(units)


def trace_model(model: nn.Module, args: tuple, kwargs: dict[str, Any], split_blocks: bool = False) -> TracedModel:
    """Capture ``model(*args, **kwargs)`` and discover its units (each block cut in two with ``split_blocks``)."""
    program = capture(model, args, kwargs)
    return from_export(program, program.graph_module, model, split_blocks)


def from_export(program: torch.export.ExportedProgram, gm: fx.GraphModule, model: nn.Module,
                split_blocks: bool = False) -> TracedModel:
    """The TracedModel of an export whose graph is ``gm`` (the program's own, or a static graph made from
    a symbolic one, ``ratel.shape_trace``): placeholders mapped to parameters and inputs, units tagged."""
    canonical = canonical_parameter_names(model)
    param_of: dict[str, str] = {}
    buffer_of: dict[str, str] = {}
    user_inputs: list[str] = []
    kinds = torch.export.graph_signature.InputKind
    for spec in program.graph_signature.input_specs:
        if spec.kind == kinds.PARAMETER:
            param_of[spec.arg.name] = canonical.get(spec.target, spec.target)
        elif spec.kind in (kinds.BUFFER, kinds.CONSTANT_TENSOR):
            buffer_of[spec.arg.name] = spec.target
        elif spec.kind == kinds.USER_INPUT:
            user_inputs.append(spec.arg.name)
        else:
            raise TraceError(f"unsupported graph input {spec.arg.name} of kind {spec.kind}: Ratel handles "
                             "parameters, buffers, constants and user inputs")
    for spec in program.graph_signature.output_specs:
        if spec.kind != torch.export.graph_signature.OutputKind.USER_OUTPUT:
            raise TraceError(f"the model mutates {spec.target} in forward ({spec.kind}); Ratel needs a forward "
                             "without buffer mutation (e.g. put BatchNorm layers in eval mode)")

    block_path = find_block_list(model)
    num_blocks = len(model.get_submodule(block_path)) if block_path else 0
    units = discover_units(gm, block_path, num_blocks, param_of, buffer_of, split_blocks)
    constants = tuple(sorted(program.constants.items(), key=lambda kv: kv[0]))
    trainable = {name: p.requires_grad for name, p in model.named_parameters(remove_duplicate=False)}
    placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    param_info: dict[str, ParamInfo] = {}
    for placeholder, name in param_of.items():
        if name not in param_info:
            val = placeholders[placeholder].meta["val"]
            param_info[name] = ParamInfo(name, tuple(int(s) for s in val.shape), val.dtype, trainable[name])
    return TracedModel(gm=gm, in_spec=program.call_spec.in_spec, out_spec=program.call_spec.out_spec,
                       params=tuple(param_of.items()), buffers=tuple(buffer_of.items()), constants=constants,
                       user_inputs=tuple(user_inputs), param_info=tuple(param_info.values()), units=units, block_path=block_path,
                       trace_device=str(_model_device(model)), split_blocks=split_blocks)


def default_kwargs(model: nn.Module, example_inputs: tuple, example_kwargs: dict | None) -> dict:
    """Keywords of an example training call: ``labels`` defaults to the first input for models taking labels."""
    params = inspect.signature(model.forward).parameters
    kwargs = dict(example_kwargs or {})
    if example_kwargs is None and "labels" in params and example_inputs:
        kwargs["labels"] = example_inputs[0]
    return kwargs


def call_kwargs(model: nn.Module, kwargs: dict) -> dict:
    """The keywords a call is traced and run with: transformers models without a KV cache, keys sorted so
    the same call with keywords in another order is the same program."""
    params = inspect.signature(model.forward).parameters
    # A wrapper forwarding **kwargs to a transformers model (peft's PeftModel) takes use_cache too.
    forwards_kwargs = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()) and hasattr(
        getattr(model, "config", None), "use_cache")
    extra = {"use_cache": False} if "use_cache" in params or forwards_kwargs else {}
    return dict(sorted({**extra, **kwargs}.items()))
