"""chunk_head_loss: compute the LM head's projection and its cross-entropy over token chunks.

The head of a causal LM projects every token to the vocabulary and takes the cross-entropy of the fp32
logits: at batch 32 x 1024 and a 50k vocabulary that is 6.6 GB of logits in bf16 and three times as much in
fp32 copies, log-softmax and gradients, more than a whole block. ``ratel.ir.losses.linear_cross_entropy``
computes the same loss and gradients a chunk of rows at a time, keeping 4 bytes a token.

Stages:
  1. Find each ``aten.cross_entropy_loss`` (no class weights, no label smoothing, mean or sum) whose input
     is an ``aten.linear``'s output reached only through shape and dtype steps: a slice along the sequence
     dimension (Ratel's GPT drops the last position), ``view``/``reshape`` to rows, ``.float()``, ``alias``,
     ``contiguous`` (transformers' ``ForCausalLMLoss`` shifts the labels instead, and passes the logits whole).
  2. Replace the loss with ``linear_cross_entropy(hidden, weight, bias, target, ignore_index, reduction,
     chunk_rows, seq_slice)``: the linear's input and parameters, and the sequence slice the logits went through.
  3. The logits: still returned when ``ctx.keep_logits`` (computed on their own, in the model's dtype, no
     fp32 copy); else dropped from the outputs — the ``HeadLoss`` analysis names the output, and the engine
     returns in its place an object that says how to keep them — and the nodes only they needed go.

Before / after (Ratel's GPT, vocabulary 128, hidden 64, keep_logits=False)::

    linear_4 = aten.linear.default(layer_norm_2, p_lm_head_weight)
    slice_1 = aten.slice.Tensor(linear_4, 1, 0, -1)
    reshape_1 = aten.reshape.default(slice_1, [-1, 128])
    to = aten.to.dtype(reshape_1, torch.float32)
    cross_entropy_loss = aten.cross_entropy_loss.default(to, reshape_2)
    return (cross_entropy_loss, linear_4)
  ->
    linear_cross_entropy = ratel.linear_cross_entropy(layer_norm_2, p_lm_head_weight, None, reshape_2, -100, 1, 2048, (0, -1))
    return (linear_cross_entropy, None)
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ratel.ir import META_PROVENANCE, META_UNIT, HeadLoss, Provenance
from ratel.ir.losses import MEAN, SUM, chunk_rows_for, linear_cross_entropy
from ratel.passes.manager import PassContext, PassResult, graph_pass

aten = torch.ops.aten
_PASS_THROUGH = {aten.alias.default, aten.contiguous.default, aten.clone.default}
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_CASTS = {aten.to.dtype, aten._to_copy.default}


def _arg(node: fx.Node, index: int, name: str, default):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _loss_options(ce: fx.Node) -> tuple[int, int] | None:
    """(reduction, ignore_index) of a cross-entropy this pass can chunk, else None."""
    weight = _arg(ce, 2, "weight", None)
    reduction = _arg(ce, 3, "reduction", MEAN)
    ignore_index = _arg(ce, 4, "ignore_index", -100)
    smoothing = _arg(ce, 5, "label_smoothing", 0.0)
    if weight is not None or smoothing != 0.0 or reduction not in (MEAN, SUM):
        return None
    return reduction, ignore_index


def _trace_back(x: fx.Node):
    """(linear node, sequence slice args or None, chain of nodes from ``x`` back to the linear) if ``x`` is
    the linear's output through shape and dtype steps only."""
    chain, seq_slice, reshaped = [], None, False
    node = x
    while node.op == "call_function" and node.target != aten.linear.default:
        if node.target in _PASS_THROUGH:
            pass
        elif node.target in _CASTS:
            dtype = _arg(node, 1, "dtype", None) if node.target == aten.to.dtype else node.kwargs.get("dtype")
            if dtype != torch.float32:
                return None
        elif node.target in _RESHAPES and not reshaped:
            shape = node.args[1]
            if len(shape) != 2:
                return None
            reshaped = True
        elif node.target == aten.slice.Tensor and seq_slice is None and reshaped:   # before the reshape, in forward order
            dim, start, end, step = (_arg(node, i, name, default) for i, name, default in
                                     ((1, "dim", 0), (2, "start", None), (3, "end", None), (4, "step", 1)))
            if dim != 1 or step != 1 or len(node.args[0].meta["val"].shape) != 3:
                return None
            seq_slice = (start, end)
        else:
            return None
        chain.append(node)
        node = node.args[0]
        if not isinstance(node, fx.Node):
            return None
    if node.op != "call_function" or not reshaped:
        return None
    return node, seq_slice, chain


def _new_node(graph: fx.Graph, target, args, unit, fake, reason: str) -> fx.Node:
    node = graph.call_function(target, args)
    node.meta["val"] = fake
    node.meta[META_UNIT] = unit
    node.meta[META_PROVENANCE] = Provenance("chunk_head_loss", "create", reason)
    return node


@graph_pass(requires=("graph:canonical",), ensures=("analysis:HeadLoss",))
def chunk_head_loss(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    graph = gm.graph
    output = next(n for n in graph.nodes if n.op == "output")
    rewritten, dropped, chunk_rows = [], [], 0
    for ce in [n for n in graph.nodes if n.op == "call_function" and n.target == aten.cross_entropy_loss.default]:
        options = _loss_options(ce)
        found = _trace_back(ce.args[0]) if options is not None and isinstance(ce.args[0], fx.Node) else None
        if found is None:
            continue
        linear, seq_slice, chain = found
        hidden, weight = linear.args[0], linear.args[1]
        bias = linear.args[2] if len(linear.args) > 2 else None
        vocab = weight.meta["val"].shape[0]
        chunk_rows = chunk_rows_for(vocab, ctx.head_chunk_bytes)
        reduction, ignore_index = options
        with graph.inserting_before(ce):
            loss = _new_node(graph, linear_cross_entropy,
                             (hidden, weight, bias, ce.args[1], ignore_index, reduction, chunk_rows, seq_slice),
                             ce.meta.get(META_UNIT), ce.meta["val"],
                             f"cross-entropy of the head over chunks of {chunk_rows} rows")
        ce.replace_all_uses_with(loss)
        graph.erase_node(ce)
        rewritten.append(loss.name)
        # The logits' own uses: the graph's output (the user's .logits), nothing else once the loss is gone.
        outputs = list(output.args[0])
        logit_outputs = [i for i, v in enumerate(outputs) if v is linear or v in chain]
        if not ctx.keep_logits:
            for i in logit_outputs:
                outputs[i] = None
            output.args = (tuple(outputs),)
            dropped += logit_outputs
        for node in [*chain, linear]:
            if not node.users:
                graph.erase_node(node)
    if rewritten:
        graph.lint()
        gm.recompile()
    return PassResult(gm, modified=bool(rewritten),
                      analysis=HeadLoss(losses=tuple(rewritten), dropped_outputs=tuple(sorted(dropped)),
                                        chunk_rows=chunk_rows, kept_logits=ctx.keep_logits))
