"""A new input shape reuses the model's symbolic capture: its graph is the static export's, op for op, and
it trains bit for bit as a statically traced program and as PyTorch."""
import pytest
import torch
import torch.utils._pytree as pytree

import ratel
from ratel.ir import META_UNIT
from ratel.shape_trace import ShapeOutsideGuards, SymbolicCapture, TraceCache
from ratel.trace import call_kwargs, trace_model

from helpers import VOCAB, assert_trained_alike, make_model, train_like_pytorch


def _graph_record(gm):
    """Everything that makes two graphs the same program: ops, arguments, names, value geometry, units."""
    out = []
    storages = {}       # which values share a storage: the first node holding it, and the storage's size
    for node in gm.graph.nodes:
        vals = [(tuple(t.shape), tuple(t.stride()), t.storage_offset(), t.dtype, t.requires_grad,
                 storages.setdefault(t.untyped_storage()._cdata, (node.name, t.untyped_storage().nbytes())))
                for t in pytree.tree_leaves(node.meta.get("val")) if isinstance(t, torch.Tensor)]
        args = pytree.tree_map(lambda a: a.name if isinstance(a, torch.fx.Node) else a, (node.args, node.kwargs))
        out.append((node.op, node.name, str(node.target), repr(args), vals, node.meta.get(META_UNIT)))
    return out


def _call(model, shape, seed=0):
    ids = torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))
    return (ids,), call_kwargs(model, {"labels": ids.clone()})


@pytest.mark.parametrize("kind", ["gpt", "llama", "gpt2"])
def test_a_shape_from_the_symbolic_capture_is_the_static_graph(kind):
    model = make_model(kind, dropout=0.1, layers=2)
    args, kwargs = _call(model, (2, 16))
    capture = SymbolicCapture.export(model, args, kwargs)
    assert capture is not None
    for shape in [(3, 23), (4, 9), (2, 16)]:
        args, kwargs = _call(model, shape)
        flat, _ = pytree.tree_flatten((args, kwargs))
        for split in (False, True):
            ours = capture.traced(model, flat, split)
            static = trace_model(model, args, kwargs, split_blocks=split)
            assert _graph_record(ours.gm) == _graph_record(static.gm)
            assert ours.units == static.units and ours.params == static.params
            assert ours.user_inputs == static.user_inputs and ours.param_info == static.param_info


def test_a_shape_outside_the_guards_is_traced_statically():
    model = make_model("gpt", layers=2)
    capture = SymbolicCapture.export(model, *_call(model, (2, 16)))
    with pytest.raises(ShapeOutsideGuards):     # export specialises size 1: batch 1 is another graph
        capture.concrete(pytree.tree_flatten(_call(model, (1, 16)))[0])
    traces = TraceCache()
    for shape in [(2, 16), (2, 12), (1, 16), (3, 8)]:
        args, kwargs = _call(model, shape)
        traced = traces.trace(model, args, kwargs, split_blocks=False)
        assert tuple(traced.gm.graph.find_nodes(op="placeholder", target="input_ids")[0].meta["val"].shape) == shape
    # the first shape statically, the second exports symbolically, batch 1 falls back, (3, 8) substitutes
    assert (traces.static_traces, traces.symbolic_hits) == (2, 2)


def _ragged(lengths, batch=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, VOCAB, (batch, s), generator=g), torch.randint(0, VOCAB, (batch, s), generator=g))
            for s in lengths]


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_ragged_batches_reuse_the_capture_and_train_like_pytorch(kind):
    lengths = [16, 12, 20, 12, 9, 16, 23]
    result = train_like_pytorch(make_model(kind, dropout=0.1, layers=2), _ragged(lengths))
    engine = result["engine"]
    assert engine._traces.static_traces == 1 and engine._traces.symbolic_hits == 4   # five distinct shapes
    assert len(engine._programs) == 5
    assert_trained_alike(result)
    engine.close()


def test_ragged_batches_train_bit_for_bit_as_static_traces():
    """The same run with every shape exported statically (the engine without its trace cache)."""
    data = _ragged([16, 12, 20, 9])
    runs = []
    for symbolic in (True, False):
        model = make_model("gpt", dropout=0.1, layers=2)
        engine = ratel.compile(model, budget="1GiB", optimizer=ratel.AdamW(lr=1e-3, weight_decay=0.1),
                               example_inputs=(data[0][0],), device="cpu", progress=False)
        if not symbolic:
            engine._traces = None
        losses = []
        for step, (ids, labels) in enumerate(data):
            torch.manual_seed(100 + step)
            loss = engine(ids, labels=labels).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        if symbolic:
            assert engine._traces.symbolic_hits == 3
        runs.append((losses, engine.state_dict()))
        engine.close()
    (ours, our_state), (static, static_state) = runs
    assert ours == static
    assert all(torch.equal(our_state[name], static_state[name]) for name in static_state)
