import pytest
import torch

import ratel
from helpers import batches, make_model
from ratel.errors import RatelError


def test_ring_views_alias_the_slot_and_state_dict_round_trips():
    model = make_model("gpt_untied")
    engine = ratel.compile(model, budget="1GiB", example_inputs=(batches(1)[0][0],), device="cpu", progress=False)
    store = engine._store
    plan = engine.plan
    views = store.unit_views(1, 0)
    for name, view in views.items():
        assert view.untyped_storage().data_ptr() == store.ring[0].untyped_storage().data_ptr()
        assert tuple(view.shape) == tuple(model.get_parameter(name).shape)
    assert set(views) == set(plan.units[1].params)
    state = engine.state_dict()
    for name, p in model.named_parameters():
        assert torch.equal(state[name], p.detach()), name
    engine.close()


def test_a_source_of_the_wrong_shape_is_refused(tmp_path):
    from safetensors.torch import save_file
    model = make_model("gpt")
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    tensors["wpe.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(tmp_path / "m.safetensors"))
    with pytest.raises(RatelError, match="wpe.weight"):
        ratel.compile(model, budget="1GiB", weights=tmp_path, example_inputs=(batches(1)[0][0],), device="cpu",
                      progress=False)
