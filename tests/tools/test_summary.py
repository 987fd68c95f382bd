"""ratel.summary(plan): golden text for the tiny GPT, predicted and beside a measured step; deterministic."""
import ratel
import pytest
from plan_util import assert_golden, fake_record, tiny_plan

from ratel.ir import Span, format_bytes
from ratel.tools.summary import (measured_busy, measured_by_step, measured_disk, memory_by_tier, predicted_breakdown,
                                 step_figures)


def test_summary_matches_golden():
    assert_golden("tiny_summary.txt", ratel.summary(tiny_plan()))


def test_summary_with_a_measured_step_matches_golden():
    plan = tiny_plan()
    assert_golden("tiny_summary_measured.txt", ratel.summary(plan, fake_record(plan)))


def test_summary_is_deterministic_and_shows_every_section():
    first, second = ratel.summary(tiny_plan()), ratel.summary(tiny_plan())
    assert first == second
    for heading in ("Memory by tier", "Time by lane", "Per unit", "Per step"):
        assert heading in first
    for unit in ("embed", "blocks.0", "blocks.1", "head"):
        assert unit in first


def test_the_tier_table_adds_up_to_the_planned_totals():
    plan = tiny_plan()
    tiers = memory_by_tier(plan)
    assert sum(tiers["gpu"].values()) == plan.memory.gpu_peak
    assert sum(tiers["host"].values()) == plan.memory.host_total
    assert sum(tiers["ssd"].values()) == plan.memory.ssd_total
    total_row = next(line for line in ratel.summary(plan).splitlines() if line.strip().startswith("total "))
    assert total_row.split()[1:3] == format_bytes(plan.memory.gpu_peak).split()


def test_the_predicted_step_splits_into_compute_stalls_and_tail():
    plan = tiny_plan()
    split = predicted_breakdown(plan)
    assert split["compute"] + split["copy stalls"] + split["optimizer tail"] == pytest.approx(plan.times.total)
    assert split["compute"] == pytest.approx(plan.times.compute)
    figures = step_figures(plan)
    assert [f.step for f in figures] == [s.index for s in plan.steps]
    assert all(f.bound in ("compute", "h2d", "d2h", "ssd", "optimizer", "") for f in figures)


def test_measured_figures_stand_beside_the_predicted():
    plan = tiny_plan()
    record = fake_record(plan, slowdown=3.0)
    text = ratel.summary(plan, record)
    assert f"{record.wall / plan.times.total:.2f}x predicted" in text
    assert f"device peak {format_bytes(record.gpu_peak)}" in text     # a plan for the CPU: its "GPU" is host memory
    assert "meas. device" in text


def test_a_cpu_run_without_gpu_peaks_says_so():
    plan = tiny_plan()
    record = fake_record(plan, gpu_extra=0)
    record = type(record)(spans=record.spans, gpu_peak_by_step=(0,) * len(plan.steps), gpu_peak=0, wall=record.wall)
    assert "device peak not recorded" in ratel.summary(plan, record)


def test_the_ssd_lane_is_busy_while_either_channel_moves_data_and_its_idle_time_is_shown():
    plan = tiny_plan()
    record = fake_record(plan)
    wall = record.wall
    disk = (Span("ssd_read", "read a", 0.0, 0.4 * wall, 0, 4 << 20), Span("ssd_write", "write a", 0.2 * wall,
            0.5 * wall, 1, 2 << 20), Span("ssd_read", "read b", 0.6 * wall, 0.7 * wall, -1, 1 << 20))
    record = type(record)(spans=record.spans + disk, gpu_peak_by_step=record.gpu_peak_by_step,
                          gpu_peak=record.gpu_peak, wall=wall)
    assert measured_busy(record)["ssd"] == pytest.approx(0.6 * wall)      # not the channels' sum, 0.8
    by_step = measured_by_step(plan, record)
    assert by_step[0]["ssd"] == pytest.approx(0.4 * wall) and by_step[1]["ssd"] == pytest.approx(0.3 * wall)
    assert by_step[-1]["ssd"] == pytest.approx(0.1 * wall)
    assert measured_disk(record) == pytest.approx({"read": 5 << 20, "written": 2 << 20, "busy": 0.6 * wall,
                                                   "read_busy": 0.5 * wall, "write_busy": 0.3 * wall})
    line = next(x.strip() for x in ratel.summary(plan, record).splitlines() if "SSD measured" in x)
    assert f"({(7 << 20) / (0.6 * wall) / 1e9:.2f} GB/s while busy)" in line
    assert measured_disk(fake_record(plan)) is None
    assert "SSD measured" not in ratel.summary(plan, fake_record(plan))
