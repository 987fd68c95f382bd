"""Graph capture and unit discovery."""
import pytest
import torch
from torch import nn

import ratel
from helpers import batches, make_model
from ratel.ir import META_UNIT
from ratel.trace import canonical_parameter_names, find_block_list, trace_model


def _trace(kind, device="cpu"):
    model = make_model(kind, layers=3, device=device)
    ids = batches(1)[0][0].to(device)
    kwargs = {"labels": ids}
    if kind in ("gpt2", "llama"):
        kwargs["use_cache"] = False
    return model, trace_model(model, (ids,), kwargs)


@pytest.mark.parametrize("kind,blocks", [("gpt", "blocks"), ("gpt2", "transformer.h"), ("llama", "model.layers")])
def test_units_are_embed_blocks_head(kind, blocks):
    model, traced = _trace(kind)
    assert traced.block_path == blocks
    assert [u.name for u in traced.units] == ["embed", f"{blocks}.0", f"{blocks}.1", f"{blocks}.2", "head"]
    assert [u.kind for u in traced.units] == ["pre", "block", "block", "block", "post"]
    # Every compute node has a unit; every block reads exactly its own parameters.
    for node in traced.gm.graph.nodes:
        if node.op not in ("placeholder", "output"):
            assert node.meta.get(META_UNIT) in {u.name for u in traced.units}, node.format_node()
    for unit in traced.units[1:-1]:
        assert unit.params and all(p.startswith(unit.name + ".") for p in unit.params)
    # Parameters are partitioned: each is read by the units that use it in the model.
    read = {p for u in traced.units for p in u.params}
    assert read == set(dict(model.named_parameters()))


def test_tied_weights_resolve_to_one_canonical_parameter():
    model, traced = _trace("gpt")
    assert canonical_parameter_names(model)["lm_head.weight"] == "wte.weight"
    embed, head = traced.units[0], traced.units[-1]
    assert "wte.weight" in embed.params and "wte.weight" in head.params
    assert "lm_head.weight" not in {p.name for p in traced.param_info}


def test_dropout_marks_units_random():
    model = make_model("gpt", dropout=0.1, layers=2)
    ids = batches(1)[0][0]
    traced = trace_model(model, (ids,), {"labels": ids})
    assert [u.has_random_ops for u in traced.units] == [True, True, True, False]
    model = make_model("gpt", dropout=0.0, layers=2)
    traced = trace_model(model, (ids,), {"labels": ids})
    assert not any(u.has_random_ops for u in traced.units)


def test_meta_device_capture_allocates_nothing():
    model, traced = _trace("llama", device="meta")
    assert traced.trace_device == "meta"
    assert all(p.is_meta for p in model.parameters())
    assert len(traced.units) == 5


def test_aliased_example_arguments_stay_separate_inputs():
    model = make_model("gpt", layers=2)
    ids = batches(1)[0][0]
    traced = trace_model(model, (ids,), {"labels": ids})   # the same tensor twice
    embed = [n for n in traced.gm.graph.nodes if n.target == torch.ops.aten.embedding.default][0]
    assert "input_ids" in [a.name for a in embed.all_input_nodes]


def test_find_block_list_picks_the_largest_uniform_list():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.small = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
            self.mixed = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 4)])
            self.blocks = nn.ModuleList([nn.Linear(16, 16) for _ in range(3)])
    assert find_block_list(Net()) == "blocks"
    assert find_block_list(nn.Linear(2, 2)) is None


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.blocks = nn.ModuleList([Branchy() for _ in range(2)])

    def forward(self, input_ids, labels=None):
        x = self.emb(input_ids)
        for block in self.blocks:
            x = block(x)
        return x.sum()


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum().item() > 0:   # data-dependent control flow cannot be captured
            return self.lin(x)
        return x


def test_untraceable_model_names_the_module_and_line():
    model = DataDependent()
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ratel.TraceError) as info:
        ratel.compile(model, budget="1GiB", example_inputs=(ids,), device="cpu")
    message = str(info.value)
    assert "blocks.0" in message and "Branchy" in message
    assert "if x.sum().item() > 0" in message
    assert "test_trace.py" in message and "What to change" in message


def test_a_wrong_dtype_input_gives_a_short_error_with_the_users_line():
    import traceback
    import sys
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from helpers import batches, make_model
    model = make_model("gpt", layers=2)
    ids, labels = batches(1)[0]
    engine = ratel.compile(model, budget="1GiB", example_inputs=(ids,), device="cpu", progress=False)
    with pytest.raises(ratel.TraceError) as info:
        engine(ids.float(), labels=labels)
    text = "".join(traceback.format_exception(info.value))
    assert "direct cause" not in text and len(text.splitlines()) < 40, text
    assert "self.wte(input_ids)" in str(info.value) and "dtype and shape" in str(info.value)
    assert info.value.original is not None            # export's own error is kept for whoever debugs
    engine.close()


@pytest.mark.parametrize("kind", ["gpt", "gpt2", "llama", "qwen2"])
def test_split_blocks_cut_each_block_at_the_residual_stream_after_attention(kind):
    from ratel.trace import call_kwargs
    model = make_model(kind, layers=2)
    ids = batches(1, batch=2, seq=8)[0][0]
    traced = trace_model(model, (ids,), call_kwargs(model, {"labels": ids}), split_blocks=True)
    names = [u.name for u in traced.units]
    assert names[0] == "embed" and names[-1] == "head" and len(names) == 2 + 2 * 2
    assert traced.split_blocks
    for first, second in zip(traced.units[1::2], traced.units[2::2]):
        assert first.name.endswith(":0") and second.name.endswith(":1")
        assert any("attn" in p for p in first.params) and not any("mlp" in p for p in first.params)
        assert any("mlp" in p for p in second.params)
        # One value crosses the cut: the residual stream, [batch, seq, hidden].
        members = {n for n in traced.gm.graph.nodes if n.meta.get(META_UNIT) == first.name}
        later = {n for n in traced.gm.graph.nodes if n.meta.get(META_UNIT) == second.name}
        crossing = {n for n in members if any(u in later for u in n.users)}
        assert len(crossing) == 1
        (value,) = crossing
        assert value.target == torch.ops.aten.add.Tensor and tuple(value.meta["val"].shape)[:2] == (2, 8)


def test_block_cut_prefers_the_fewest_crossing_bytes_on_a_synthetic_block():
    """a = f(x), b = g(a), s = a + b, c = h(s), k(c): a cut right after b sends a and b across, after s only s
    (as after c only c); of the two one-value cuts, the one after s splits the parameters evenly."""
    from ratel.trace import block_cut

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.f, self.g, self.h = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
            self.k = nn.Linear(8, 8)

        def forward(self, x):
            a = self.f(x)
            b = self.g(a)
            c = self.h(a + b)
            return self.k(c)

    exported = torch.export.export(Block(), (torch.randn(2, 8),), strict=False)
    param_of = {s.arg.name: s.target for s in exported.graph_signature.input_specs
                if s.kind == torch.export.graph_signature.InputKind.PARAMETER}
    members = [n for n in exported.graph_module.graph.nodes if n.op == "call_function"]
    cut = block_cut(members, param_of)
    aten = torch.ops.aten
    assert [n.target for n in members[:cut]] == [aten.linear.default, aten.linear.default, aten.add.Tensor]
    assert block_cut(members[:1], param_of) is None                                # one linear: nothing to cut
