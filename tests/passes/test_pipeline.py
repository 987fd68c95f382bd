"""plan_call: whole blocks first; when the GPU budget refuses them, each block cut in two units. The halves
train exactly like PyTorch, need less GPU memory, and a refusal names both minimums."""
import pytest

import ratel
from helpers import batches, make_model, max_relative_difference, train_like_pytorch
from ratel.errors import BudgetError


def whole_block_minimum(model, ids) -> int:
    return ratel.explain(model, "1TiB", (ids,), device="cpu", activations="recompute").memory.gpu_peak


@pytest.mark.parametrize("kind", ["gpt", "gpt2", "llama"])
def test_a_budget_below_the_whole_block_minimum_trains_in_halves_exactly_like_pytorch(kind):
    model = make_model(kind, layers=3, dropout=0.1)
    data = batches(3, batch=4, seq=16)
    budget = int(whole_block_minimum(model, data[0][0]) * 0.9)
    result = train_like_pytorch(model, data, budget=budget)
    engine = result["engine"]
    names = [u.name for u in engine.plan.units]
    assert len(names) == 2 + 2 * 3 and names[1].endswith(":0") and names[2].endswith(":1")
    assert engine.plan.memory.gpu_peak <= budget
    assert result["losses"] == result["ref_losses"]
    worst, name = max_relative_difference(engine.state_dict(), result["reference"])
    engine.close()
    assert worst == 0.0, name


def test_whole_blocks_are_kept_when_they_fit():
    model = make_model("gpt", layers=2)
    ids = batches(1, batch=4, seq=16)[0][0]
    plan = ratel.explain(model, whole_block_minimum(model, ids), (ids,), device="cpu", activations="recompute")
    assert not any(":" in u.name for u in plan.units)


def test_a_refusal_names_the_minimum_of_whole_blocks_and_of_halves():
    model = make_model("gpt", layers=2)
    ids = batches(1, batch=4, seq=16)[0][0]
    halves_minimum = None
    with pytest.raises(BudgetError) as info:
        ratel.explain(model, 1 << 16, (ids,), device="cpu", activations="recompute")
    message = str(info.value)
    assert "With whole blocks as units it needs at least" in message and "cut in two units" in message
    halves_minimum = info.value.needed
    assert halves_minimum < whole_block_minimum(model, ids)
    # The minimum it names is one that plans.
    ratel.explain(model, halves_minimum, (ids,), device="cpu", activations="recompute")


def test_every_shape_of_an_engine_takes_the_units_of_its_first():
    model = make_model("gpt", layers=2)
    small, large = batches(1, batch=2, seq=16)[0][0], batches(1, batch=8, seq=16)[0][0]
    budget = whole_block_minimum(model, small)          # whole blocks fit the small shape only
    engine = ratel.compile(model, budget=budget, example_inputs=(small,), device="cpu", progress=False,
                           activations="recompute")
    assert not any(":" in u.name for u in engine.plan.units)
    with pytest.raises(BudgetError, match="compile with the largest shape as example_inputs"):
        engine(large, labels=large)
    engine.close()
