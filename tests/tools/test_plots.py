"""Plots: PNGs are written for predicted and measured steps; lanes follow the predicted model; labels fit."""
import dataclasses

import pytest
from plan_util import fake_record, tiny_plan

from ratel.ir import Phase, Plan, Step, Unit
from ratel.tools.plots import declutter, gpu_series, plot_memory, plot_timeline, predicted_lanes, save_plots, unit_ticks

PNG = b"\x89PNG\r\n\x1a\n"


def test_plots_are_written_as_png(tmp_path):
    plan = tiny_plan()
    paths = save_plots(plan, tmp_path / "predicted")
    paths += save_plots(plan, tmp_path / "measured", fake_record(plan), prefix="tiny_")
    assert [p.name for p in paths] == ["memory.png", "timeline.png", "tiny_memory.png", "tiny_timeline.png"]
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG) and len(data) > 20_000, path


def test_the_same_plan_draws_the_same_bytes(tmp_path):
    plan = tiny_plan()
    a, b = save_plots(plan, tmp_path / "a"), save_plots(plan, tmp_path / "b")
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def test_measured_step_adds_a_panel_and_a_peak_line():
    import matplotlib.pyplot as plt
    plan = tiny_plan()
    record = fake_record(plan)
    predicted, measured = plot_timeline(plan), plot_timeline(plan, record)
    assert len(predicted.axes) < len(measured.axes)
    titles = [ax.get_title(loc="left") for ax in measured.axes]
    assert any(t.startswith("Predicted step") for t in titles) and any(t.startswith("Measured step") for t in titles)
    memory = plot_memory(plan, record)
    assert "measured peak" in memory.axes[0].get_title(loc="left")
    for fig in (predicted, measured, memory):
        plt.close(fig)


def test_gpu_series_stack_to_the_planned_totals():
    plan = tiny_plan()
    series = gpu_series(plan)
    for step in plan.memory.steps:
        assert sum(values[step.step] for values in series.values()) == step.gpu


def test_predicted_lanes_follow_the_time_model():
    plan = tiny_plan()
    bars, starts = predicted_lanes(plan)
    # The GPU's part ends with the last compute; steps start in order.
    assert starts[-1] == pytest.approx(max(start + duration for start, duration, _ in bars["compute"]))
    assert starts == sorted(starts)
    ends = [start + duration for items in bars.values() for start, duration, _ in items]
    assert max(ends) == pytest.approx(plan.times.total)
    # No lane overlaps itself: one stream, one queue.
    for lane, items in bars.items():
        for (s1, d1, _), (s2, _, _) in zip(items, items[1:]):
            assert s2 >= s1 + d1 - 1e-15, lane


def _synthetic_plan(blocks: int) -> Plan:
    """A plan with only what the x axis reads: units and steps."""
    plan = tiny_plan()
    units = [Unit(0, "embed", "pre", (), ())] + [Unit(i + 1, f"model.layers.{i}", "block", (), ())
                                                 for i in range(blocks)] + [Unit(blocks + 1, "lm_head", "post", (), ())]
    n = len(units)
    steps = [Step(i, Phase.FWD, i) for i in range(n)] + [Step(n + k, Phase.BWD, n - 1 - k) for k in range(n)]
    return dataclasses.replace(plan, units=tuple(units), steps=tuple(steps))


@pytest.mark.parametrize("blocks", [3, 100])
def test_unit_labels_fit_for_few_and_many_units(blocks):
    plan = _synthetic_plan(blocks)
    positions, labels, caption = unit_ticks(plan)
    n = len(plan.steps)
    xs, shown = declutter([p + 0.5 for p in positions], labels, px_per_x=1080 / n, fontsize=8.5)
    assert shown.count("embed") == 2 and "lm_head" in shown
    assert xs == sorted(xs)
    if blocks == 3:
        assert len(shown) == n and "model.layers.1" in shown      # every unit, by name
    else:
        assert 10 <= len(shown) <= 30 and "50" in shown           # a round subset, by number
        assert "model.layers.N" in caption
    # No two kept labels overlap at 8.5 pt.
    widths = [len(label) * 8.5 * 0.62 / 2 for label in shown]
    for (x1, w1), (x2, w2) in zip(zip(xs, widths), zip(xs[1:], widths[1:])):
        assert (x2 - x1) * 1080 / n >= w1 + w2
