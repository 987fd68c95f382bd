"""Plots of a plan, saved as PNG: where the memory goes and where the time goes, predicted and measured.

``plot_memory(plan, measured=None, path=None)``
    Left: GPU bytes over the step's timeline (forward of every unit, then backward), stacked by category
    (parameters in the ring, gradients, activations, workspace, buffers and outputs) with the budget line;
    a measured step's per-step GPU peak is drawn over it. Right: host and SSD, one stacked bar each with
    the host budget: they are allocated once and stay for the whole step.
``plot_timeline(plan, measured=None, path=None)``
    One lane per resource: compute, H2D, D2H, SSD, CPU optimizer. Predicted: timeline steps laid end to end,
    each lasting its longest GPU-side lane, optimizer work queued on its own lane from the end of the step
    that makes it ready (the model of ``predict_times`` in ratel/passes/verify_plan.py). Measured (second
    panel, same time axis): the spans of a ``StepRecord``.

Both use matplotlib's Agg backend (no display needed) and return the Figure; with ``path`` they also write
the PNG. Unit names label the x axis: all of them for a few units, a regular subset for a hundred.
"""
from __future__ import annotations

import re
from pathlib import Path

from ratel.ir import Phase, Plan, StepRecord, format_bytes
from ratel.tools.summary import (CATEGORIES, LANE_TITLES, accelerator, MEASURED_LANE, lanes_of, format_seconds, gpu_category,
                                 memory_by_tier, predicted_breakdown, tail_name)

# One colour per memory category, shared by the GPU area and the host/SSD bars so one legend reads both.
CATEGORY_COLORS = {"parameters": "#4C72B0", "gradients": "#DD8452", "optimizer states": "#937860",
                   "activations": "#55A868", "workspace": "#C44E52", "buffers and outputs": "#8172B3",
                   "other": "#BBBBBB"}
LANE_COLORS = {"compute": "#4C72B0", "h2d": "#55A868", "d2h": "#8172B3", "ssd": "#937860", "optimizer": "#DD8452",
               "comm": "#C44E52"}
BACKWARD_COMPUTE = "#27466F"
_BINARY = (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10), ("B", 1))


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=False)   # no display needed; keeps an interactive backend chosen by the user
    import matplotlib.pyplot as plt
    return plt


def _byte_unit(largest: float) -> tuple[str, int]:
    for name, scale in _BINARY:
        if largest >= scale:
            return name, scale
    return "B", 1


def _time_unit(largest: float) -> tuple[str, float]:
    if largest >= 2.0:
        return "s", 1.0
    if largest >= 2e-3:
        return "ms", 1e-3
    return "µs", 1e-6


# ---------------------------------------------------------------------------------------------------------
# Unit labels on the x axis
# ---------------------------------------------------------------------------------------------------------
def _block_prefix(plan: Plan) -> str | None:
    """``blocks.`` when every block unit is named prefix + number (so ticks can show just the number)."""
    prefixes = set()
    for unit in plan.units:
        if unit.kind == "block":
            match = re.fullmatch(r"(.*?\.)(\d+)", unit.name)
            if match is None:
                return None
            prefixes.add(match.group(1))
    return prefixes.pop() if len(prefixes) == 1 else None


def _short(plan: Plan, unit: int, prefix: str | None) -> str:
    name = plan.units[unit].name
    return name[len(prefix):] if prefix and plan.units[unit].kind == "block" and len(plan.units) > 6 else name


def _nice_stride(count: int, slots: int) -> int:
    for stride in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000):
        if count / stride <= slots:
            return stride
    return max(count // slots, 1)


def unit_ticks(plan: Plan, max_per_phase: int = 12) -> tuple[list[int], list[str], str]:
    """Candidate step indices and labels for the x axis, most important first, and the axis caption.

    Every unit is a candidate when there are few; otherwise the first and last units, the last block and
    every k-th block (k a round number), in forward and in backward. ``declutter`` then drops candidates
    that would overlap at the plot's size, so 5 units and 100 units both read cleanly.
    """
    prefix = _block_prefix(plan)
    blocks = [u.index for u in plan.units if u.kind == "block"]
    stride = _nice_stride(len(blocks), max(max_per_phase - 2, 1))
    ends = {u.index for u in plan.units if u.kind != "block"}
    regular = {b for k, b in enumerate(blocks) if k % stride == 0}
    if blocks:
        regular.add(blocks[-1])
    ranked = []
    for step in plan.steps:
        if step.unit in ends or step.unit in regular:
            rank = 0 if step.unit in ends else 1 if step.unit in (blocks[0], blocks[-1]) else 2
            ranked.append((rank, step.index, _short(plan, step.unit, prefix)))
    ranked.sort(key=lambda r: (r[0], r[1]))
    caption = "timeline step: forward through the units, then backward"
    if prefix and len(plan.units) > 6:
        caption += f"  (blocks shown by number: {prefix}N)"
    return [r[1] for r in ranked], [r[2] for r in ranked], caption


def declutter(xs: list[float], labels: list[str], px_per_x: float, fontsize: float) -> tuple[list[float], list[str]]:
    """Keep labels in the given (priority) order unless they would overlap one already kept; sorted by x."""
    def half_width(label: str) -> float:
        return len(label) * fontsize * 0.62 / 2 + 5      # px, DejaVu Sans averages ~0.6 em per character

    kept: list[tuple[float, str]] = []
    for x, label in zip(xs, labels):
        if all(abs(x - kx) * px_per_x >= half_width(label) + half_width(klabel) for kx, klabel in kept):
            kept.append((x, label))
    kept.sort()
    return [x for x, _ in kept], [label for _, label in kept]


def _phase_marks(ax, plan: Plan, x_of_step, y: float = 1.0, va: str = "bottom", px_per_x: float = 0.0) -> None:
    """Shade the backward half and name both halves (``y`` in axes fraction) where the names fit."""
    first_bwd = next((s.index for s in plan.steps if s.phase == Phase.BWD), None)
    if first_bwd is None:
        return
    start, end = x_of_step(first_bwd), x_of_step(len(plan.steps))
    ax.axvspan(start, end, color="#EEEEEE", zorder=0, lw=0)
    for x, x_end, text in ((x_of_step(0), start, " forward"), (start, end, " backward")):
        if px_per_x and (x_end - x) * px_per_x < len(text) * 9 * 0.62:
            continue    # too narrow to name (a step dominated by the optimizer's tail); the shading remains
        ax.text(x, y, text, transform=ax.get_xaxis_transform(), ha="left", va=va, fontsize=9, color="#555555")


# ---------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------
def gpu_series(plan: Plan) -> dict[str, list[int]]:
    """GPU bytes per timeline step, by category (categories that are zero everywhere are left out)."""
    series: dict[str, list[int]] = {}
    for memory in plan.memory.steps:
        totals: dict[str, int] = {}
        for label, nbytes in memory.breakdown:
            key = gpu_category(label)
            totals[key] = totals.get(key, 0) + nbytes
        for key in totals:
            series.setdefault(key, [0] * len(plan.memory.steps))
        for key, value in totals.items():
            series[key][memory.step] = value
    order = [c for c in CATEGORIES if c in series] + [c for c in series if c not in CATEGORIES]
    return {c: series[c] for c in order if any(series[c])}


def plot_memory(plan: Plan, measured: StepRecord | None = None, path: str | Path | None = None):
    """GPU memory over the step by category (and measured), host and SSD beside it. Returns the Figure."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    n = len(plan.steps)
    series = gpu_series(plan)
    peak = plan.memory.gpu_peak
    # A CPU run records no GPU peaks (all zero): nothing to draw.
    measured_peaks = list(measured.gpu_peak_by_step[:n]) if measured is not None and measured.gpu_peak else []
    top = max([peak] + measured_peaks) * 1.18 or 1
    # A budget within a few times the peak is drawn (the headroom is the message); a far larger one would
    # flatten the plot into a line, so it is written instead.
    budget_on_scale = plan.budget_gpu <= top * 5
    if budget_on_scale:
        top = max(top, plan.budget_gpu * 1.08)
    unit, scale = _byte_unit(top)

    fig = plt.figure(figsize=(13, 5.4), layout="constrained")
    grid = fig.add_gridspec(1, 2, width_ratios=(5.2, 1.3))
    ax = fig.add_subplot(grid[0, 0])
    side = fig.add_subplot(grid[0, 1])

    # GPU: stacked steps (each timeline step is one column from x = i to i + 1).
    xs = [i for i in range(n + 1)]
    base = [0.0] * (n + 1)
    for category, values in series.items():
        ys = [v / scale for v in values] + [values[-1] / scale]
        upper = [b + y for b, y in zip(base, ys)]
        ax.fill_between(xs, base, upper, step="post", color=CATEGORY_COLORS.get(category, "#BBBBBB"),
                        lw=0, label=category, zorder=2)
        base = upper
    _phase_marks(ax, plan, lambda i: i)
    peak_step = plan.memory.gpu_peak_step
    ax.annotate(f"planned peak {_fmt_bytes(peak)}\n{plan.steps[peak_step].label(plan.units)}",
                xy=(peak_step + 0.5, peak / scale), xytext=(0, 14), textcoords="offset points", ha="center",
                va="bottom", fontsize=8.5, arrowprops=dict(arrowstyle="-", color="#333333", lw=0.8), zorder=5)
    if budget_on_scale:
        ax.axhline(plan.budget_gpu / scale, color="#C00000", ls="--", lw=1.3, zorder=4)
        ax.text(n - 0.2, plan.budget_gpu / scale, f"{accelerator(plan)} budget {_fmt_bytes(plan.budget_gpu)}", color="#C00000",
                va="bottom", ha="right", fontsize=9, zorder=5)
    else:
        ax.text(0.005, 0.985, f"{accelerator(plan)} budget {_fmt_bytes(plan.budget_gpu)} (off the scale: the plan uses "
                f"{100 * peak / plan.budget_gpu:.2g}% of it)", transform=ax.transAxes, color="#C00000",
                va="top", fontsize=9)
    if measured_peaks:
        # The measured peak of each step, as a black outline over the planned stack.
        ax.stairs([v / scale for v in measured_peaks], range(len(measured_peaks) + 1), color="black", lw=1.6,
                   baseline=None, label="measured peak", zorder=6)
    ax.set_xlim(0, n)
    ax.set_ylim(0, top / scale)
    positions, labels, caption = unit_ticks(plan)
    ticks, labels = declutter([p + 0.5 for p in positions], labels, px_per_x=1080 / n, fontsize=8.5)
    ax.set_xticks(ticks, labels, fontsize=8.5)
    ax.set_xlabel(caption)
    ax.set_ylabel(f"{accelerator(plan)} memory ({unit})")
    ax.set_title(f"{accelerator(plan)} memory over one training step (planned peak {_fmt_bytes(peak)} of "
                 f"{_fmt_bytes(plan.budget_gpu)} budget)" + (f"; measured peak {_fmt_bytes(measured.gpu_peak)}"
                                                            if measured_peaks else ""),
                 loc="left", fontsize=11, pad=16)
    ax.grid(axis="y", color="#DDDDDD", lw=0.6, zorder=1)
    ax.set_axisbelow(True)

    # Host and SSD: allocated for the whole run, so one bar each.
    tiers = memory_by_tier(plan)
    largest = max(plan.memory.host_total, plan.memory.ssd_total, 1)
    host_budget_on_scale = plan.budget_host <= largest * 1.6
    side_top = max(largest, plan.budget_host if host_budget_on_scale else 0) * 1.15
    side_unit, side_scale = _byte_unit(side_top)
    for x, tier in ((0, "host"), (1, "ssd")):
        bottom = 0.0
        for category, nbytes in tiers[tier].items():
            if nbytes:
                side.bar(x, nbytes / side_scale, bottom=bottom, width=0.6,
                         color=CATEGORY_COLORS.get(category, "#BBBBBB"), zorder=2)
                bottom += nbytes / side_scale
        total = plan.memory.host_total if tier == "host" else plan.memory.ssd_total
        label_at = bottom
        if tier == "host" and host_budget_on_scale and abs(plan.budget_host - total) < 0.06 * side_top:
            label_at = max(bottom, plan.budget_host / side_scale) + 0.02 * side_top / side_scale  # clear the line
        side.text(x, label_at, _fmt_bytes(total), ha="center", va="bottom", fontsize=8.5)
    if host_budget_on_scale:
        side.hlines(plan.budget_host / side_scale, -0.4, 0.4, color="#C00000", ls="--", lw=1.3, zorder=4)
        side.text(0.42, plan.budget_host / side_scale, "budget", color="#C00000", va="center", fontsize=8)
    side.set_xticks([0, 1], [f"host\n(budget {_fmt_bytes(plan.budget_host)})", "SSD"], fontsize=8.5)
    side.set_xlim(-0.6, 1.6)
    side.set_ylim(0, side_top / side_scale)
    side.set_ylabel(f"allocated for the whole step ({side_unit})")
    side.set_title("host and SSD", loc="left", fontsize=11, pad=16)
    side.grid(axis="y", color="#DDDDDD", lw=0.6, zorder=1)
    side.set_axisbelow(True)

    used = [c for c in CATEGORY_COLORS if c in series or any(tiers[t].get(c) for t in ("host", "ssd"))]
    handles = [Patch(color=CATEGORY_COLORS[c], label=c) for c in used]
    if measured_peaks:
        from matplotlib.lines import Line2D
        handles.append(Line2D([], [], color="black", lw=1.6, label="measured peak (per step)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.0, 0.9), fontsize=8.5, framealpha=0.92,
              ncols=1)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------------
# Timeline
# ---------------------------------------------------------------------------------------------------------
def predicted_lanes(plan: Plan) -> tuple[dict[str, list[tuple[float, float, int]]], list[float]]:
    """Bars per lane as (start, duration, step) in seconds, and the start of every step (plus the end): the
    simulator's spans (``plan.times.spans``) as it scheduled them, the one timeline model the summary's
    figures also come from."""
    bars: dict[str, list[tuple[float, float, int]]] = {lane: [] for lane in lanes_of(plan)}
    first: dict[int, float] = {}
    gpu_end = 0.0
    for span in plan.times.spans:
        lane = MEASURED_LANE.get(span.lane)
        if lane is not None:
            bars[lane].append((span.start, span.end - span.start, span.step))
        if span.lane == "compute":
            first.setdefault(span.step, span.start)
            gpu_end = max(gpu_end, span.end)
    # Steps begin where the simulation started their compute; the last one ends with the GPU's work.
    return bars, [first.get(i, 0.0) for i in range(len(plan.steps))] + [gpu_end]


def _lane_axis(ax, lanes: list[str]) -> dict[str, int]:
    rows = {lane: len(lanes) - 1 - k for k, lane in enumerate(lanes)}
    ax.set_yticks([rows[lane] for lane in lanes], [LANE_TITLES[lane] for lane in lanes], fontsize=9)
    ax.set_ylim(-0.55, len(lanes) - 0.05)    # headroom above the compute lane for the phase names
    ax.tick_params(axis="y", length=0)
    return rows


_AXIS_PX = 1250        # approximate width of a timeline panel at the saved size, for label spacing


def _unit_labels_on_top(ax, plan: Plan, centers: dict[int, float], scale: float, x_span: float) -> None:
    """Unit names above the panel at the middle of each labelled step (``centers``: step -> seconds)."""
    positions, labels, _ = unit_ticks(plan)
    pairs = [(centers[p] / scale, label) for p, label in zip(positions, labels) if p in centers]
    ticks, names = declutter([x for x, _ in pairs], [label for _, label in pairs],
                             px_per_x=_AXIS_PX / max(x_span, 1e-30), fontsize=7.5)
    top = ax.secondary_xaxis("top")
    top.set_xticks(ticks, names, fontsize=7.5)
    top.tick_params(length=2, pad=1)


def _end_marker(ax, x: float, text: str, color: str, right: bool) -> None:
    ax.axvline(x, color=color, ls="--", lw=1.2, zorder=4)
    ax.text(x, -0.5, f" {text} ", color=color, fontsize=8.5, va="bottom", ha="right" if right else "left",
            zorder=5, bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=0.5))


def _draw_predicted(ax, plan: Plan, bars, starts: list[float], end: float, title: str) -> None:
    """One panel of predicted lanes from 0 to ``end`` seconds."""
    n = len(plan.steps)
    phase_of = {s.index: s.phase for s in plan.steps}
    prefix = _block_prefix(plan)
    total = plan.times.total
    unit, scale = _time_unit(end)
    span = end / scale
    rows = _lane_axis(ax, list(lanes_of(plan)))
    for lane, items in bars.items():
        for start, duration, step in items:
            if start / scale > span:
                continue
            color = BACKWARD_COMPUTE if lane == "compute" and phase_of[step] == Phase.BWD else LANE_COLORS[lane]
            # At least ~1 px wide, so short copies on a long timeline stay visible.
            width = max(duration / scale, span / _AXIS_PX)
            ax.broken_barh([(start / scale, width)], (rows[lane] - 0.36, 0.72), facecolors=color,
                           edgecolor="white" if n <= 60 else "none", linewidth=0.5, zorder=2)
            name = _short(plan, plan.steps[step].unit, prefix)
            # Name a compute bar only where the name fits inside it.
            if lane == "compute" and duration / scale * _AXIS_PX / span > len(name) * 7.5 * 0.62 + 6:
                ax.text((start + duration / 2) / scale, rows[lane], name, ha="center", va="center", fontsize=7.5,
                        color="white", clip_on=True, zorder=3)
    _phase_marks(ax, plan, lambda i: starts[i] / scale, y=0.99, va="top", px_per_x=_AXIS_PX / span)
    if n <= 40:
        for x in starts[1:-1]:
            ax.axvline(x / scale, color="#D5D5D5", lw=0.5, zorder=1)
    if total / scale <= span:
        _end_marker(ax, total / scale, f"step ends {format_seconds(total)}", "#C00000", right=True)
    ax.set_title(title, loc="left", fontsize=11)
    _unit_labels_on_top(ax, plan, {i: (starts[i] + starts[i + 1]) / 2 for i in range(n)}, scale, span)
    ax.set_xlim(0, span)
    ax.set_xlabel(f"predicted time since the step's forward began ({unit})", fontsize=9)
    ax.grid(axis="x", color="#E0E0E0", lw=0.6, zorder=0)


def plot_timeline(plan: Plan, measured: StepRecord | None = None, path: str | Path | None = None):
    """The step's lanes over time: predicted, and measured in a second panel. Returns the Figure.

    Each panel has its own time axis (a CPU-run measurement can be many times the prediction); the measured
    panel marks where the predicted step would have ended.
    """
    plt = _pyplot()

    bars, starts = predicted_lanes(plan)
    total = plan.times.total
    gpu_end = starts[-1]
    # When the CPU optimizer / SSD tail dwarfs the GPU's part, a second panel zooms into the GPU's part.
    zoom = 0 < gpu_end < 0.3 * total
    panels = 1 + zoom + (measured is not None)
    fig, axes = plt.subplots(panels, 1, figsize=(13, 3.1 * panels + 0.7), layout="constrained", squeeze=False)
    split = predicted_breakdown(plan)
    _draw_predicted(axes[0][0], plan, bars, starts, total * 1.02,
                    f"Predicted step {format_seconds(total)} = compute {format_seconds(split['compute'])}"
                    f" + {accelerator(plan)} waiting for copies {format_seconds(split['copy stalls'])}"
                    f" + {tail_name(plan)} {format_seconds(split['optimizer tail'])}")
    if zoom:
        _draw_predicted(axes[1][0], plan, bars, starts, gpu_end * 1.02,
                        f"Predicted, the GPU's part ({format_seconds(gpu_end)}) enlarged")
    lanes = list(lanes_of(plan))
    phase_of = {s.index: s.phase for s in plan.steps}
    n = len(plan.steps)

    if measured is not None:
        mx = axes[-1][0]
        end = max([measured.wall, total] + [s.end for s in measured.spans])
        munit, mscale = _time_unit(end)
        mspan = end * 1.02 / mscale
        mrows = _lane_axis(mx, lanes)
        centers: dict[int, list[float]] = {}
        for item in measured.spans:
            lane = MEASURED_LANE.get(item.lane)
            if lane is None:
                continue
            color = LANE_COLORS[lane]
            if lane == "compute":
                centers.setdefault(item.step, []).extend((item.start, item.end))
                if phase_of.get(item.step) == Phase.BWD:
                    color = BACKWARD_COMPUTE
            if item.lane == "ssd_write":
                color = "#C49A6C"
            mx.broken_barh([(item.start / mscale, max((item.end - item.start) / mscale, mspan / _AXIS_PX))],
                           (mrows[lane] - 0.36, 0.72), facecolors=color, edgecolor="none", zorder=2)
        # The phases as measured: the backward starts with the first compute span of a backward step.
        step_starts = {k: min(v) for k, v in centers.items() if 0 <= k < n}
        bwd_start = min((t for k, t in step_starts.items() if phase_of[k] == Phase.BWD), default=None)
        if bwd_start is not None:
            bwd_end = max(max(v) for k, v in centers.items() if 0 <= k < n and phase_of[k] == Phase.BWD)
            mx.axvspan(bwd_start / mscale, bwd_end / mscale, color="#EEEEEE", zorder=0, lw=0)
            mx.text(bwd_start / mscale, 0.99, " backward", transform=mx.get_xaxis_transform(), va="top",
                    fontsize=9, color="#555555")
        mx.text(0, 0.99, " forward", transform=mx.get_xaxis_transform(), va="top", fontsize=9, color="#555555")
        _end_marker(mx, measured.wall / mscale, f"step ends {format_seconds(measured.wall)}", "black",
                    right=measured.wall >= total)
        _end_marker(mx, total / mscale, f"predicted {format_seconds(total)}", "#C00000",
                    right=total > measured.wall)
        ratio = f" ({measured.wall / total:.2f}x the predicted {format_seconds(total)})" if total else ""
        mx.set_title(f"Measured step {format_seconds(measured.wall)}{ratio}", loc="left", fontsize=11)
        _unit_labels_on_top(mx, plan, {k: (min(v) + max(v)) / 2 for k, v in centers.items() if 0 <= k < n},
                            mscale, mspan)
        mx.set_xlim(0, mspan)
        mx.set_xlabel(f"measured time since the step's forward began ({munit})", fontsize=9)
        mx.grid(axis="x", color="#E0E0E0", lw=0.6, zorder=0)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------------
def _fmt_bytes(n: float) -> str:
    return format_bytes(n)


def _save(fig, path):
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Fixed metadata: the same plan writes the same bytes (no timestamp or version in the file).
        fig.savefig(path, dpi=110, metadata={"Software": None})
    return fig


def save_plots(plan: Plan, directory: str | Path, measured: StepRecord | None = None,
               prefix: str = "") -> list[Path]:
    """Write ``memory.png`` and ``timeline.png`` (with ``prefix``) into ``directory``; returns the paths."""
    plt = _pyplot()
    directory = Path(directory)
    paths = [directory / f"{prefix}memory.png", directory / f"{prefix}timeline.png"]
    for fn, path in zip((plot_memory, plot_timeline), paths):
        plt.close(fn(plan, measured, path))
    return paths


__all__ = ["gpu_series", "plot_memory", "plot_timeline", "predicted_lanes", "save_plots", "unit_ticks"]
