"""``plan.summary()``: what Ratel decided, as text — where memory goes per tier and unit, where time goes per
lane and step, and, given a measured step (``engine.last_step``), the measured figures beside the predicted.

Sections, each a fixed-width table:
  header          units, parameters, predicted step time split into compute + copy stalls + optimizer tail,
                  the GPU peak against the budget and where it is
  memory by tier  rows: parameters, gradients, optimizer states, activations, workspace, buffers and outputs;
                  columns: GPU at the peak step, host, SSD; then total and budget
  time by lane    compute, H2D, D2H, SSD, CPU optimizer: busy time, bytes, transfers (and measured busy time;
                  the SSD's is the time either of its channels moved data, with a line of what it moved, its
                  rate while busy and how long it sat idle: why an SSD-bound step is short of the disk)
  per unit        what each unit owns on which tier, its saved activations, workspace and FLOPs
  per step        the timeline: GPU bytes, bytes moved and time on each lane, the lane that bounds the step

Predicted times use the plan's model of a step (ratel/passes/verify_plan.py ``predict_times``): a timeline
step lasts as long as its longest GPU-side lane, and the CPU optimizer runs beside on a lane of its own.
Runs of consecutive units whose rows are identical (the repeated blocks) are printed as one row; measured
figures on such a row are per-step means. Everything printed is a function of the plan (and the record),
so the same plan gives the same text byte for byte.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ratel.ir import Plan, StepRecord, Tier, format_bytes

LANES = ("compute", "h2d", "d2h", "ssd", "optimizer")
LANE_TITLES = {"compute": "compute", "h2d": "H2D", "d2h": "D2H", "ssd": "SSD", "optimizer": "CPU optimizer",
               "comm": "ranks' exchange"}
# StepRecord lanes -> summary lanes (SSD reads and writes share one lane here).
MEASURED_LANE = {"compute": "compute", "h2d": "h2d", "d2h": "d2h", "ssd_read": "ssd", "ssd_write": "ssd",
                 "ssd": "ssd", "optimizer": "optimizer", "comm": "comm"}


def lanes_of(plan: Plan) -> tuple[str, ...]:
    """The lanes a plan has: with several data-parallel ranks, also their exchange before each update (on
    the CPU optimizer's thread, gradients and weights through host memory)."""
    return LANES + ("comm",) if plan.ranks > 1 else LANES

CATEGORIES = ("parameters", "gradients", "optimizer states", "activations", "workspace", "buffers and outputs")
# The planner names what it counts (``StepMemory.breakdown``, ``MemoryProfile.host_bytes``: "param ring",
# "fp32 master + adam states:blocks.3", ...); the summary sorts those names into the categories above by
# keyword, first match wins, so a new entry lands in a sensible row (or "other") without a change here.
_GPU_KEYWORDS = (("optimizer", "optimizer states"), ("param", "parameters"), ("grad", "gradients"), ("activation", "activations"),
                 ("workspace", "workspace"), ("buffer", "buffers and outputs"), ("output", "buffers and outputs"))
_HOST_KEYWORDS = (("adam", "optimizer states"), ("ssd staging", "optimizer states"), ("master", "parameters"),
                  ("compute copy", "parameters"), ("frozen", "parameters"), ("param", "parameters"),
                  ("grad", "gradients"), ("activation", "activations"))


def _categorise(label: str, keywords) -> str:
    name = label.split(":", 1)[0].lower()
    for word, category in keywords:
        if word in name:
            return category
    return "other"


def gpu_category(label: str) -> str:
    """The summary category of one entry of ``StepMemory.breakdown``."""
    return _categorise(label, _GPU_KEYWORDS)


def host_category(label: str) -> str:
    """The summary category of one entry of ``MemoryProfile.host_bytes``."""
    return _categorise(label, _HOST_KEYWORDS)


def optimizer_state_bytes(group) -> int:
    """Adam m and v, plus the fp32 master unless the group computes in fp32 (then the master is the copy
    that is streamed, counted as the parameters)."""
    return group.numel * 4 * (2 if group.dtype == torch.float32 else 3)


# ---------------------------------------------------------------------------------------------------------
# Figures derived from the plan (shared with ratel/tools/plots.py)
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepFigures:
    """One timeline step: GPU bytes, bytes and seconds per lane (predicted), the lane that bounds it."""

    step: int
    label: str
    gpu: int
    nbytes: dict[str, int]
    seconds: dict[str, float]
    transfers: dict[str, int]

    @property
    def length(self) -> float:
        return max(self.seconds["compute"], self.seconds["h2d"], self.seconds["d2h"])

    @property
    def bound(self) -> str:
        """The lane with the most work in this step (the SSD and the CPU optimizer included)."""
        if not any(self.seconds.values()):
            return ""
        # Ties go to compute: a step whose copies exactly match its compute is not waiting on them.
        return max(self.seconds, key=lambda lane: (self.seconds[lane], lane == "compute"))


def step_figures(plan: Plan) -> list[StepFigures]:
    out = []
    exchanges: dict[int, list] = {}      # the simulated exchanges of the ranks, by step (no transfer of the plan)
    for span in plan.times.spans:
        if span.lane == "comm":
            exchanges.setdefault(span.step, []).append(span)
    for step, memory, time in zip(plan.steps, plan.memory.steps, plan.times.steps):
        nbytes = dict.fromkeys(lanes_of(plan), 0)
        count = dict.fromkeys(lanes_of(plan), 0)
        for t in plan.transfers_at(step.index):
            lane = t.lane
            if lane is not None:
                nbytes[lane] += t.nbytes
                count[lane] += 1
        seconds = {"compute": time.compute, "h2d": time.h2d, "d2h": time.d2h,
                   "ssd": getattr(time, "ssd", 0.0), "optimizer": time.optimizer}
        if plan.ranks > 1:
            seconds["comm"] = time.comm
            nbytes["comm"] = sum(span.nbytes for span in exchanges.get(step.index, ()))
            count["comm"] = len(exchanges.get(step.index, ()))
        out.append(StepFigures(step.index, step.label(plan.units), memory.gpu, nbytes, seconds, count))
    return out


def predicted_breakdown(plan: Plan) -> dict[str, float]:
    """The predicted step as a sum: compute, + GPU waiting on copies, + the CPU optimizer's (and the SSD's)
    tail after the GPU is done."""
    figures = step_figures(plan)
    compute = sum(f.seconds["compute"] for f in figures)
    gpu = sum(f.length for f in figures)
    return {"compute": compute, "copy stalls": gpu - compute, "optimizer tail": max(plan.times.total - gpu, 0.0),
            "total": plan.times.total}


def tail_name(plan: Plan) -> str:
    """What the step waits for after the GPU's last step: the CPU optimizer, and the SSD when it is used."""
    uses_ssd = any(getattr(t, "ssd", 0.0) for t in plan.times.steps)
    return "CPU optimizer + SSD tail" if uses_ssd else "CPU optimizer tail"


def _union_seconds(intervals) -> float:
    """Seconds covered by any of the (start, end) intervals: the SSD's read and write channels run at once, and
    the disk is busy while either moves data."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def _busy(spans) -> dict[str, float]:
    """Busy seconds per lane of ``spans``: summed per lane, but the union of the SSD's channels."""
    busy: dict[str, float] = {}
    disk = []
    for span in spans:
        lane = MEASURED_LANE.get(span.lane)
        if lane == "ssd":
            disk.append((span.start, max(span.end, span.start)))
        elif lane is not None:
            busy[lane] = busy.get(lane, 0.0) + max(span.end - span.start, 0.0)
    if disk:
        busy["ssd"] = _union_seconds(disk)
    return busy


def measured_by_step(plan: Plan, measured: StepRecord) -> dict[int, dict[str, float]]:
    """Measured busy seconds per timeline step and lane (spans outside the timeline under key -1)."""
    by_step: dict[int, list] = {}
    for span in measured.spans:
        by_step.setdefault(span.step if 0 <= span.step < len(plan.steps) else -1, []).append(span)
    return {step: {**dict.fromkeys(lanes_of(plan), 0.0), **_busy(spans)} for step, spans in by_step.items()
            if any(MEASURED_LANE.get(s.lane) is not None for s in spans)}


def measured_busy(measured: StepRecord) -> dict[str, float]:
    return {**dict.fromkeys(LANES, 0.0), **_busy(measured.spans)}


def measured_disk(measured: StepRecord) -> dict[str, float] | None:
    """What the SSD lane did in a measured step: bytes read and written, seconds it was busy (either channel)
    and each channel's busy seconds; None when it recorded nothing."""
    reads = [s for s in measured.spans if s.lane == "ssd_read"]
    writes = [s for s in measured.spans if s.lane == "ssd_write"]
    if not reads and not writes:
        return None
    return {"read": sum(s.nbytes for s in reads), "written": sum(s.nbytes for s in writes),
            "busy": _union_seconds((s.start, s.end) for s in reads + writes),
            "read_busy": _union_seconds((s.start, s.end) for s in reads),
            "write_busy": _union_seconds((s.start, s.end) for s in writes)}


def memory_by_tier(plan: Plan) -> dict[str, dict[str, int]]:
    """tier -> category -> bytes: the GPU at its peak step, the host, the SSD."""
    gpu = dict.fromkeys(CATEGORIES, 0)
    for label, nbytes in plan.memory.steps[plan.memory.gpu_peak_step].breakdown:
        key = gpu_category(label)
        gpu[key] = gpu.get(key, 0) + nbytes
    host = dict.fromkeys(CATEGORIES, 0)
    for label, nbytes in plan.memory.host_bytes:
        key = host_category(label)
        host[key] = host.get(key, 0) + nbytes
    # The SSD holds optimizer states, and parameters or activations where the placement says so.
    ssd = dict.fromkeys(CATEGORIES, 0)
    groups = {g.name: g for g in plan.groups}
    ssd["parameters"] = sum(groups[name].nbytes for name, tier in plan.placement.param_tier if tier == Tier.SSD)
    ssd["activations"] = sum(a.nbytes for a in plan.placement.activations if a.tier == Tier.SSD)
    ssd["optimizer states"] = max(plan.memory.ssd_total - ssd["parameters"] - ssd["activations"], 0)
    return {"gpu": gpu, "host": host, "ssd": ssd}


def short_range(names: list[str]) -> str:
    """``blocks.1..94`` for a run of numbered siblings, else ``first .. last``."""
    if len(names) == 1:
        return names[0]
    first = re.fullmatch(r"(.*?)(\d+)", names[0])
    last = re.fullmatch(r"(.*?)(\d+)", names[-1])
    if first and last and first.group(1) == last.group(1):
        return f"{names[0]}..{last.group(2)}"
    return f"{names[0]} .. {names[-1]}"


# ---------------------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------------------
def format_seconds(seconds: float) -> str:
    if seconds == 0:
        return "0 s"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if abs(seconds) >= scale or unit == "us":
            return f"{seconds / scale:.2f} {unit}"
    raise AssertionError("unreachable")


def _time_unit(largest: float) -> tuple[str, float]:
    if largest >= 1.0:
        return "s", 1.0
    if largest >= 1e-3:
        return "ms", 1e-3
    return "us", 1e-6


def format_flops(n: float) -> str:
    """FLOPs with an SI prefix and three significant digits: ``409.6 K``, ``7.63 T``."""
    if n == 0:
        return "-"
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            value = n / scale
            return f"{value:.3g} {prefix}" if value < 100 else f"{value:.0f} {prefix}"
    return f"{n:.0f}"


def _b(n: int) -> str:
    return format_bytes(n) if n else "-"


def _t(seconds: float, scale: float) -> str:
    if not seconds:
        return "-"
    value = seconds / scale
    if value < 0.005:
        return "<0.01"     # not zero: it did take time, less than the table shows
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _pct(part: float, whole: float) -> str:
    if not whole:
        return "-"
    share = 100 * part / whole
    return f"{share:.1f}%" if share < 10 else f"{share:.0f}%"


def _table(header: list[str], rows: list[list[str]], align: str, indent: str = "  ") -> list[str]:
    """Fixed-width columns; ``align`` holds one 'l' or 'r' per column."""
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(cells):
        parts = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, align)]
        return (indent + "  ".join(parts)).rstrip()

    return [line(header)] + [line(r) for r in rows]


def _merge_runs(keys: list, items: list) -> list[list]:
    """Group consecutive items whose keys are equal."""
    runs: list[list] = []
    for key, item in zip(keys, items):
        if runs and runs[-1][0] == key:
            runs[-1][1].append(item)
        else:
            runs.append([key, [item]])
    return [items_ for _, items_ in runs]


# ---------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------
def accelerator(plan: Plan) -> str:
    """What the "GPU tier" is called for this plan: a plan for the CPU runs its "GPU" tier in host memory."""
    return "GPU" if str(plan.device).startswith("cuda") else "device"


def _header(plan: Plan, measured: StepRecord | None) -> list[str]:
    units = plan.units
    names = [u.name for u in units]
    shown = ", ".join(names) if len(names) <= 6 else f"{names[0]}, {names[1]} .. {names[-2]}, {names[-1]}"
    numel = sum(g.numel for g in plan.groups)
    dtype = str(plan.compute_dtype).replace("torch.", "")
    param_bytes = sum(g.nbytes for g in plan.groups)
    on_gpu = plan.placement.gpu_groups
    split = predicted_breakdown(plan)
    peak_step = plan.steps[plan.memory.gpu_peak_step]
    lines = [
        f"Ratel plan for {plan.device}: {len(units)} units ({shown})"
        + (f", run by each of {plan.ranks} data-parallel ranks" if plan.ranks > 1 else ""),
        f"  parameters   {numel:,} in {len(plan.groups)} groups, {dtype} ({format_bytes(param_bytes)})"
        + (f"; {len(on_gpu)} kept on the {accelerator(plan)} and updated there ({short_range(on_gpu)})"
           if on_gpu else ""),
        f"  step time    {format_seconds(split['total'])} predicted = compute {format_seconds(split['compute'])}"
        f" + waiting for copies {format_seconds(split['copy stalls'])}"
        f" + {tail_name(plan)} {format_seconds(split['optimizer tail'])}",
        f"  {accelerator(plan) + ' peak':<13}{format_bytes(plan.memory.gpu_peak)} of {format_bytes(plan.budget_gpu)} budget "
        f"({_pct(plan.memory.gpu_peak, plan.budget_gpu)}) at step {peak_step.index} ({peak_step.label(units)})",
        f"  host         {format_bytes(plan.memory.host_total)} of {format_bytes(plan.budget_host)} budget "
        f"({_pct(plan.memory.host_total, plan.budget_host)}); SSD {format_bytes(plan.memory.ssd_total)}",
    ]
    if measured is not None:
        ratio = f", {measured.wall / split['total']:.2f}x predicted" if split["total"] else ""
        peak = "device peak not recorded (no CUDA device)"
        if measured.gpu_peak:
            peak = f"{accelerator(plan)} peak {format_bytes(measured.gpu_peak)}"
            peak += f", {measured.gpu_peak / plan.memory.gpu_peak:.2f}x planned" if plan.memory.gpu_peak else ""
        lines.append(f"  measured     step {format_seconds(measured.wall)}{ratio}; {peak}")
    return lines


def _tier_section(plan: Plan, measured: StepRecord | None) -> list[str]:
    tiers = memory_by_tier(plan)
    categories = list(CATEGORIES) + [c for t in tiers.values() for c in t if c not in CATEGORIES]
    categories = list(dict.fromkeys(categories))
    rows = [[c] + [_b(tiers[t].get(c, 0)) for t in ("gpu", "host", "ssd")] for c in categories]
    totals = [sum(tiers[t].values()) for t in ("gpu", "host", "ssd")]
    rows.append(["total"] + [format_bytes(n) for n in totals])
    rows.append(["budget", format_bytes(plan.budget_gpu), format_bytes(plan.budget_host), "-"])
    if measured is not None and measured.gpu_peak:
        rows.append(["measured peak", format_bytes(measured.gpu_peak), "", ""])
    peak = plan.steps[plan.memory.gpu_peak_step]
    gpu = accelerator(plan)
    return (["", f"Memory by tier ({gpu}: at its peak, step {peak.index} {peak.label(plan.units)})"]
            + _table(["", gpu, "host", "SSD"], rows, "lrrr"))


def _lane_section(plan: Plan, measured: StepRecord | None, figures: list[StepFigures]) -> list[str]:
    busy = {lane: sum(f.seconds[lane] for f in figures) for lane in lanes_of(plan)}
    nbytes = {lane: sum(f.nbytes[lane] for f in figures) for lane in lanes_of(plan)}
    count = {lane: sum(f.transfers[lane] for f in figures) for lane in lanes_of(plan)}
    real = measured_busy(measured) if measured is not None else None
    largest = max([plan.times.total] + ([measured.wall] if measured is not None else []))
    unit, scale = _time_unit(largest)
    header = ["lane", f"busy ({unit})", "of step", "bytes", "transfers"]
    if real is not None:
        header += [f"measured ({unit})", "of step"]
    rows = []
    for lane in lanes_of(plan):
        moves = "updates" if lane == "optimizer" else "collectives" if lane == "comm" else ""
        row = [LANE_TITLES[lane], _t(busy[lane], scale), _pct(busy[lane], plan.times.total) if busy[lane] else "-",
               _b(nbytes[lane]) if lane != "compute" else "-",
               f"{count[lane]} {moves}".strip() if count[lane] else "-"]
        if real is not None:
            row += [_t(real.get(lane, 0.0), scale), _pct(real[lane], measured.wall) if real.get(lane) else "-"]
        rows.append(row)
    step_row = ["step", _t(plan.times.total, scale), "", "", ""]
    if real is not None:
        step_row += [_t(measured.wall, scale), ""]
    rows.append(step_row)
    note = ["  lanes run at once: busy times overlap and do not add up to the step"]
    disk = measured_disk(measured) if measured is not None else None
    if disk is not None and disk["busy"] > 0:
        moved = disk["read"] + disk["written"]
        note.append(f"  SSD measured: read {format_bytes(disk['read'])} in {format_seconds(disk['read_busy'])}, wrote "
                    f"{format_bytes(disk['written'])} in {format_seconds(disk['write_busy'])}; busy "
                    f"{format_seconds(disk['busy'])} ({moved / disk['busy'] / 1e9:.2f} GB/s while busy), idle "
                    f"{format_seconds(max(measured.wall - disk['busy'], 0.0))} of the step")
    return ["", "Time by lane"] + _table(header, rows, "lrrrr" + "rr" * (real is not None)) + note


def _unit_section(plan: Plan) -> list[str]:
    placement = plan.placement
    param_tier = dict(placement.param_tier)
    opt_tier = dict(placement.optimizer_tier)
    rows = []
    keys = []
    for unit, cost in zip(plan.units, plan.costs.units):
        owned = [g for g in plan.groups if g.update_unit == unit.index]
        params = sum(g.nbytes for g in owned)
        grads = sum(g.nbytes for g in owned if g.trainable)
        states = sum(optimizer_state_bytes(g) for g in owned if g.trainable)
        ptiers = sorted({str(param_tier[g.name]) for g in owned})
        otiers = sorted({str(opt_tier[g.name]) for g in owned if g.name in opt_tier})
        outs = [a for a in placement.activations if a.producer == unit.index]
        by_tier: dict[str, int] = {}
        for act in outs:
            by_tier[str(act.tier)] = by_tier.get(str(act.tier), 0) + act.nbytes
        saved = ", ".join(f"{format_bytes(n)} {t}" for t, n in sorted(by_tier.items())) or "-"
        cells = [_b(params), "/".join(ptiers) or "-", _b(grads), _b(states), "/".join(otiers) or "-", saved,
                 _b(cost.fwd_workspace), _b(cost.bwd_workspace), format_flops(cost.fwd_flops),
                 format_flops(cost.bwd_flops)]
        keys.append((unit.kind, tuple(cells)))
        rows.append((unit.name, cells))
    out_rows = []
    for run in _merge_runs(keys, rows):
        out_rows.append([short_range([name for name, _ in run])] + run[0][1])
    total = [sum(g.nbytes for g in plan.groups), sum(g.nbytes for g in plan.groups if g.trainable),
             sum(optimizer_state_bytes(g) for g in plan.groups if g.trainable)]
    out_rows.append(["total", _b(total[0]), "", _b(total[1]), _b(total[2]), "",
                     _b(sum(a.nbytes for a in placement.activations if a.producer >= 0)), "", "",
                     format_flops(plan.costs.total_fwd_flops), format_flops(plan.costs.total_bwd_flops)])
    header = ["unit", "params", "home", "grads", "opt states", "home", "outputs kept", "fwd work", "bwd work",
              "fwd FLOP", "bwd FLOP"]
    gpu = accelerator(plan)
    note = [f"  params: the compute-dtype copy streamed to the {gpu} ring; opt states: Adam m, v and the fp32 master",
            "  (for fp32 models the master is the params copy); a group read by several units belongs to the first;",
            f"  outputs kept: the unit's boundary activations and where they wait for backward; work: {gpu} workspace",
            "  of the unit's forward, and of its recompute + backward"]
    return ["", "Per unit"] + _table(header, out_rows, "lrlrrllrrrr") + note


def _activation_section(plan: Plan) -> list[str]:
    """Per unit, where what autograd saves waits for the backward, and what recomputing the rest costs."""
    acts = getattr(plan, "activations", None)
    if acts is None:
        return []
    keys, items = [], []
    for unit, ua in zip(plan.units, acts.units):
        tiers = tuple(sorted({str(d.tier) for d in ua.decisions}))
        # Blocks merge by mode and by the tiers they use; their bytes and times add up over the run.
        keys.append((unit.kind, ua.mode, tiers) if unit.kind == "block" else (unit.index,))
        items.append((unit.name, ua))
    rows = []
    for run in _merge_runs(keys, items):
        units = [ua for _, ua in run]
        name = short_range([n for n, _ in run])
        if units[0].mode == "recompute":
            rows.append([name, "recompute unit", "-", "-", "-", "-", format_seconds(0.0)])
            continue
        total = lambda tier: sum(u.bytes_on(tier) for u in units)   # noqa: E731
        seconds = sum(d.recompute_seconds for u in units for d in u.decisions if d.tier is None)
        rows.append([name, "saved", _b(total(Tier.GPU)), _b(total(Tier.HOST)), _b(total(Tier.SSD)), _b(total(None)),
                     format_seconds(seconds)])
    header = ["unit", "mode", f"kept on {accelerator(plan)}", "swapped to host", "swapped to SSD", "recomputed",
              "recompute time"]
    title = f"Activations (policy {acts.policy}"
    fitting = [r for r in acts.search if r[2] <= plan.budget_gpu]
    if fitting:
        best = min(fitting, key=lambda r: r[1])
        chosen = ("checkpoints whole units (recompute)" if best[0] < 0
                  else f"stores {best[0]} of the values autograd saves")
        title += f"; {len(acts.search)} candidate plans priced, the fastest that fits {chosen}"
    note = ["  saved: the unit's forward keeps what autograd saves, each value where the plan put it (merged blocks:",
            "  totals over the run);",
            "  recompute unit: only the unit's inputs are kept and the whole unit runs again in backward"]
    return ["", title + ")"] + _table(header, rows, "llrrrrr") + note


def _step_section(plan: Plan, measured: StepRecord | None, figures: list[StepFigures]) -> list[str]:
    real = measured_by_step(plan, measured) if measured is not None else None
    largest = max(max((f.length for f in figures), default=0.0), max((f.seconds["optimizer"] for f in figures),
                                                                      default=0.0))
    if real is not None:
        largest = max([largest] + [v for lanes in real.values() for v in lanes.values()])
    unit, scale = _time_unit(largest)
    show_ssd = any(f.nbytes["ssd"] for f in figures) or bool(real and any(v["ssd"] for v in real.values()))
    lanes = [lane for lane in lanes_of(plan) if lane != "ssd" or show_ssd]
    def cells_of(fs: list[StepFigures]) -> list[str]:
        n = len(fs)
        gpu = max(f.gpu for f in fs)
        nbytes = {lane: sum(f.nbytes[lane] for f in fs) // n for lane in lanes_of(plan)}
        seconds = {lane: sum(f.seconds[lane] for f in fs) / n for lane in lanes_of(plan)}
        return ([_b(gpu)] + [_b(nbytes[lane]) for lane in lanes if lane not in ("compute", "optimizer")]
                + [_t(seconds[lane], scale) for lane in lanes] + [fs[0].bound])

    keys, items = [], []
    for f, step in zip(figures, plan.steps):
        unit_kind = plan.units[step.unit].kind
        # Only repeated blocks merge, by phase and by the lane that bounds them (figures: means, GPU: max);
        # the embedding and head rows stay visible whatever their figures.
        keys.append((step.phase, unit_kind, f.bound) if unit_kind == "block" else (step.index,))
        items.append((f, step, None))
    runs = _merge_runs(keys, items)
    items = []
    for run in runs:
        cells = cells_of([f for f, _, _ in run])
        items.extend((f, step, cells) for f, step, _ in run)
    rows = []
    for run in _merge_runs(keys, items):
        first, last = run[0], run[-1]
        step_text = str(first[1].index) if len(run) == 1 else f"{first[1].index}..{last[1].index}"
        label = f"{first[1].phase} {short_range([plan.units[s.unit].name for _, s, _ in run])}"
        row = [step_text, label] + first[2]
        if real is not None:
            n = len(run)
            peaks = measured.gpu_peak_by_step
            peak = [peaks[s.index] for _, s, _ in run if s.index < len(peaks)]
            row += ["|", _b(sum(peak) // len(peak)) if peak else "-"]
            for lane in lanes:
                row.append(_t(sum(real.get(s.index, {}).get(lane, 0.0) for _, s, _ in run) / n, scale))
        rows.append(row)
    moved = [lane for lane in lanes if lane not in ("compute", "optimizer")]
    gpu = accelerator(plan)
    header = (["step", "unit", gpu] + [f"{LANE_TITLES[lane]} bytes" for lane in moved]
              + [("optim" if lane == "optimizer" else LANE_TITLES[lane]) + f" {unit}" for lane in lanes] + ["bound"])
    align = "rl" + "r" * (1 + len(moved) + len(lanes)) + "l"
    if real is not None:
        header += ["|", f"meas. {gpu}"] + [("optim" if lane == "optimizer" else LANE_TITLES[lane]) + f" {unit}"
                                     for lane in lanes]
        align += "l" + "r" * (1 + len(lanes))
    title = f"Per step (predicted; a step lasts its longest {gpu} lane, the CPU optimizer runs beside"
    title += "; measured figures on merged rows are means)" if real is not None else ")"
    lines = ["", title] + _table(header, rows, align)
    if real is not None and -1 in real:
        outside = real[-1]
        lines.append("  outside the timeline: " + ", ".join(f"{LANE_TITLES[k]} {_t(v, scale)} {unit}"
                                                              for k, v in outside.items() if v))
    return lines


def plan_summary(plan: Plan, measured: StepRecord | None = None) -> str:
    """The summary text of ``plan``; with ``measured`` the measured figures beside the predicted ones."""
    figures = step_figures(plan)
    lines = (_header(plan, measured) + _tier_section(plan, measured) + _lane_section(plan, measured, figures)
             + _unit_section(plan) + _activation_section(plan) + _step_section(plan, measured, figures))
    return "\n".join(lines) + "\n"


__all__ = ["CATEGORIES", "LANES", "StepFigures", "gpu_category", "host_category", "measured_by_step", "measured_disk",
           "memory_by_tier", "plan_summary", "predicted_breakdown", "step_figures", "tail_name"]
