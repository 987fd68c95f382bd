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
