"""Throughput on one card under one memory cap: the GPU-resident bound, Ratel across batch sizes, DeepSpeed
ZeRO-Offload and ZeRO-Infinity, and Ratel with optimizer states partly on SSD, in one run.

The model is ratel.models.GPT (h=4096, 32 heads, seq 2048, vocab 50257 untied, 16 layers = 3.64B, bf16).
Every process but the resident bound's is capped with ``torch.cuda.set_per_process_memory_fraction``
(``--cap``, 24 GiB: standing in for a 24 GiB card). Rows, each configuration in its own process (an OOM or a
crash ends that row only, and the next starts on a clean GPU), each with a timeout (``--row-timeout``):

  resident      plain PyTorch on the GPU, uncapped: the bf16 model, fp32 master weights and torch's fused
                AdamW (``ratel.tools.bench``), with the most layers of L, L/2, L/4, ... that fit at this batch.
                Its model TFLOPS is the bound per layer; the step shown is the full model's at that rate.
  ratel         Ratel, GPU budget = cap - 1 GiB, default settings (on the GPU: the first units' groups kept there
                where the plan finds it faster, plan_resident_groups); the plan's predicted step beside it.
  ratel_streamed  the same with ``resident=False``: every group streamed, as before plan_resident_groups.
  zero_offload  DeepSpeed ZeRO-2, optimizer on the CPU      } by the harness ``ds_bench.py`` (``--harness``),
  zero3_cpu     DeepSpeed ZeRO-3, parameters and optimizer  } one process per mode over every batch (it stops
                on the CPU: ZeRO-Infinity's CPU tier        } a mode at its first OOM); skipped, with the
                                                            } reason printed, when deepspeed does not import
  disk          the raw O_DIRECT rates of ``--ssd-dir`` (``benchmarks/ssd_lane.py``): reads, writes, both
  ssd           Ratel on 32 and 40 layers (6.9B, 8.5B) with optimizer states partly in ``--ssd-dir``: the
                bytes the swapper moved per step and the SSD roofline, max(read / read rate, written / write
                rate, both / both-at-once rate), against the step

Steps: ``--warmup`` untimed, then the median of ``--steps`` (the resident bound: two warm-ups, as
``ratel.tools.bench`` times). Model TFLOPS = (6 N tokens + 12 L h s^2 B) / step, N every parameter
(embeddings too), recompute not counted, for every system alike (DeepSpeed's steps are re-counted so: its
harness leaves the embeddings out of N). Rows go as JSON lines to ``<out>/rows.jsonl`` (``--out``: $OUT when
set, else runs/throughput); then a Markdown table (``<out>/table.md``) with the card and the cap, and a plot
of model TFLOPS against batch (``<out>/throughput.png``) like Figure 5 of the ZeRO-Infinity and Ratel papers.
After its timed steps each Ratel row runs one profiled step and appends ``ratel.summary`` of it (every lane
and step, predicted beside measured) to ``<out>/profiles.txt``: why a row is short (``--no-profile``: not).
An SSD row's table line also says how long its SSD lane moved data in that step and at what rate: a row short
of its roofline with the disk busy throughout is bound by the disk's rate, one with the disk idle by the runtime.
``--append-results`` appends the table to benchmarks/RESULTS.md; ``--report FILE ...`` makes the table and
plot again from rows.jsonl files (several runs' rows side by side).

On the GPU machine, one ``run`` call (timeout_s 600, carry ``.whl``: DeepSpeed's wheels built here as the
harness's README.md says, and the harness copied beside them, since ../shared does not travel:
``cp ../shared/baselines/deepspeed/ds_bench.py .whl/``):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 \
    && python3 setup.py build_ext --inplace -q \
    && python3 benchmarks/throughput.py --harness .whl --time-budget 480 \
           --systems resident ratel ratel_streamed zero_offload zero3_cpu

and, in a second call, after the same install, export and build, the SSD rows:

    python3 benchmarks/throughput.py --systems disk ssd --ssd-dir /tmp/ratel-ssd --steps 2 --time-budget 480

(every system at every batch is expected to need more than one call's 10 minutes). ``--time-budget`` ends
the run in time: a row's timeout is cut to what is left, and a row with under 30 s left (60 s for a
DeepSpeed mode) is marked skipped. The first call keeps the resident bound, Ratel and ZeRO-Infinity in one
run for the ratio; ``--report first/rows.jsonl second/rows.jsonl`` puts both calls' rows in one table.

On a machine without a GPU, ``--smoke`` runs the same logic on the CPU with a tiny GPT (2 layers, h=64, seq
32, B=1,2) and no DeepSpeed, in well under a minute:

    python benchmarks/throughput.py --smoke [--ssd-dir /tmp/ssd]
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import ratel
from ratel.errors import BudgetError
from ratel.ir import Tier, format_bytes
from ratel.models import GPT, GPTConfig
from ratel.passes.simulate import ssd_bytes_moved
from ratel.runtime.calibrate import detect, measure_disk, with_disk
from ratel.tools.bench import _baseline, model_flops
from ratel.tools.summary import measured_disk
from ssd_lane import host_entries, roofline      # a script beside this one

ROOT = Path(__file__).resolve().parent.parent
DEEPSPEED = ("zero_offload", "zero3_cpu")
SYSTEMS = ("resident", "ratel", "ratel_streamed", *DEEPSPEED, "disk", "ssd")
TITLES = {"resident": "GPU-resident PyTorch (bound)", "ratel": "Ratel",
          "ratel_streamed": "Ratel, every group streamed (resident=False)", "zero_offload": "ZeRO-Offload",
          "zero3_cpu": "ZeRO-Infinity (CPU)", "ssd": "Ratel, states partly on SSD"}
# The tiny shape of --smoke (each a default the command line can still change).
SMOKE = dict(layers=2, hidden=64, heads=4, vocab=256, seq=32, batches=[1, 2], cap="2GiB", steps=2,
             ssd_layers=[3], ssd_batches=[1], ssd_states=0.5, row_timeout=120, sustained="64MiB")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--cap", default="24GiB", help="GPU memory a process may use (stands in for a smaller card); "
                   "Ratel's GPU budget is 1 GiB less")
    p.add_argument("--host", default=None, help="Ratel's host budget (default: 90%% of this machine's memory)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--steps", type=int, default=3, help="timed steps (their median is the step)")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS), help="rows to run")
    p.add_argument("--harness", default="../shared/baselines/deepspeed",
                   help="folder of DeepSpeed's ds_bench.py (relative to the repository root)")
    p.add_argument("--ssd-dir", default=None, help="folder on the SSD: the disk and ssd rows run only with it")
    p.add_argument("--ssd-layers", type=int, nargs="+", default=[32, 40], help="layers of the SSD rows' models")
    p.add_argument("--ssd-batches", type=int, nargs="+", default=[16])
    p.add_argument("--ssd-states", type=float, default=None,
                   help="fraction of the optimizer states pushed to SSD by the host budget (default: the host "
                        "budget alone decides)")
    p.add_argument("--sustained", default="16GiB",
                   help="bytes each way of the disk row's sustained measurement (0: only the short probe)")
    p.add_argument("--row-timeout", type=float, default=600, help="seconds a row's process may take")
    p.add_argument("--time-budget", type=float, default=0, help="seconds for the whole run; rows that would "
                   "start past it are skipped (0: no limit)")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "runs" / "throughput"),
                   help="folder of rows.jsonl, table.md and throughput.png")
    p.add_argument("--append-results", action="store_true", help="append the table to --results")
    p.add_argument("--results", default=str(Path(__file__).parent / "RESULTS.md"))
    p.add_argument("--report", nargs="+", metavar="ROWS_JSONL", help="only make the table and plot from these")
    p.add_argument("--no-profile", dest="profile", action="store_false",
                   help="skip the profiled step after each Ratel row (its summary goes to <out>/profiles.txt)")
    p.add_argument("--smoke", action="store_true", help="a tiny GPT on the CPU, no DeepSpeed (tests the script)")
    p.add_argument("--row", help=argparse.SUPPRESS)          # in a row's own process: the row to run
    p.add_argument("--result", help=argparse.SUPPRESS)       # ... and the file its JSON goes to
    argv = sys.argv[1:] if argv is None else argv
    if "--smoke" in argv:
        p.set_defaults(**SMOKE)
    return p.parse_args(argv)


def gpt_config(args, layers: int) -> GPTConfig:
    return GPTConfig(vocab_size=args.vocab, n_layer=layers, n_head=args.heads, d_model=args.hidden,
                     max_seq_len=args.seq, tie_embeddings=False, dropout=0.0)


def setup(args) -> dict:
    """The options every row of a run shares: kept in each row, so that ``--report`` reads them back."""
    return {k: getattr(args, k) for k in ("layers", "hidden", "heads", "vocab", "seq", "cap", "host")}


def flops(args, layers: int, batch: int) -> float:
    return model_flops(gpt_config(args, layers).num_parameters(), layers, args.hidden, batch, args.seq)


# ---------------------------------------------------------------------------------------------------------
# One row, in its own process
# ---------------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def resident_row(args, batch: int, device: torch.device, dtype: torch.dtype) -> dict:
    """The most layers of L, L/2, L/4, ... whose plain-PyTorch step fits the whole (uncapped) device."""
    ids = torch.randint(0, args.vocab, (batch, args.seq), generator=torch.Generator().manual_seed(batch)).to(device)
    layers = args.layers
    while True:
        timing, why, _ = _baseline(gpt_config(args, layers), dtype, ids, args.steps, device)
        if timing is not None:
            break
        print(f"resident, batch {batch}, {layers} layers: {why}", flush=True)
        if layers == 1:
            return {"status": "OOM", "note": f"1 layer: {why}"}
        layers //= 2
    scale = flops(args, args.layers, batch) / flops(args, layers, batch)
    return {"step": timing.median * scale, "range": [timing.low * scale, timing.high * scale],
            "measured_layers": layers, "measured_step": timing.median,
            "tflops": flops(args, layers, batch) / timing.median / 1e12,
            "note": f"{layers} of {args.layers} layers measured, uncapped; step scaled to {args.layers}"}


def ratel_row(args, layers: int, batch: int, device: torch.device, dtype: torch.dtype, ssd_dir=None,
              resident: bool | None = None, measured=None) -> dict:
    """Ratel's median step; with ``ssd_dir`` the swapper's bytes per step and the plan's SSD bytes too.
    ``resident``: as ``compile``'s (None: the groups the planner keeps on the GPU; False: none).
    ``measured(out)`` is called with the timed result before the profiled step and the close, which at ~50 s
    a step and tens of GiB of swap files can outlast the row's timeout."""
    with torch.device("meta"):
        model = GPT(gpt_config(args, layers)).to(dtype).train()
    torch.manual_seed(0)     # compile initialises the meta weights: the same step-0 loss in every run
    ids = torch.randint(0, args.vocab, (batch, args.seq), generator=torch.Generator().manual_seed(batch)).to(device)
    gpu = ratel.parse_bytes(args.cap) - (1 << 30)
    host = ratel.parse_bytes(args.host) if args.host else None
    # One profile for the plans explained here and the one compiled (explain alone would not measure the disk).
    hardware = with_disk(detect(device), ssd_dir) if ssd_dir is not None else None
    if ssd_dir is not None and args.ssd_states is not None:
        host = ssd_host_budget(model, ids, gpu, ssd_dir, device, hardware, args.ssd_states)

    def build(host):
        return ratel.compile(model, budget=ratel.Budget(gpu=gpu, host=host, ssd_dir=ssd_dir),
                             optimizer=ratel.AdamW(lr=1e-5), example_inputs=(ids,), device=device, progress=False,
                             resident=resident, hardware=hardware)
    try:
        try:
            engine = build(host)
        except BudgetError as e:
            if ssd_dir is None or args.ssd_states is None or e.tier != "host":
                raise
            engine = build(e.needed)     # the SSD's staging buffers took more than the states left: as ssd_lane.py
    except BudgetError as e:
        return {"status": "refused", "note": f"refused at planning: {e.tier} needs {format_bytes(e.needed)}"}
    plan = engine.plan
    swapper = engine._resources.swapper
    times, losses, counted = [], [], None
    for step in range(args.warmup + args.steps):
        sync(device)
        if step == args.warmup and swapper is not None:
            swapper.wait_all()
            counted = swapper.stats()
        t0 = time.perf_counter()
        loss = engine(ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        sync(device)
        losses.append(loss.item())
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    out = {"step": step_s, "range": [min(times), max(times)], "predicted": plan.times.total,
           "tflops": flops(args, layers, batch) / step_s / 1e12, "losses": losses,
           "planned_gpu": plan.memory.gpu_peak, "planned_host": plan.memory.host_total,
           "planned_ssd": plan.memory.ssd_total}
    on_gpu = plan.placement.gpu_groups
    notes = []
    if on_gpu:
        notes.append(f"{len(on_gpu)} of {len(plan.groups)} groups on the GPU ({on_gpu[0]} .. {on_gpu[-1]})")
    if ssd_dir is not None and swapper is None:
        notes.append("nothing on the SSD: the host budget held every state")
    if not all(math.isfinite(x) for x in losses):
        # A speed figure from a run whose weights went non-finite is not one to report without saying so.
        notes.append("losses " + ", ".join(f"{x:.4g}" for x in losses))
    if notes:
        out["note"] = "; ".join(notes)
    if swapper is not None:
        swapper.wait_all()
        now = swapper.stats()
        planned_read, planned_written = ssd_bytes_moved(plan.transfers)
        out.update(read=(now["bytes_read"] - counted["bytes_read"]) / args.steps,
                   written=(now["bytes_written"] - counted["bytes_written"]) / args.steps,
                   planned_read=planned_read, planned_written=planned_written,
                   states_on_ssd=sum(t == Tier.SSD for _, t in plan.placement.optimizer_tier),
                   groups=len(plan.placement.optimizer_tier))
    if measured is not None:
        measured(out)
    if args.profile:
        # One more step, profiled (untimed: the events cost a little): the plan's lanes beside the measured ones,
        # the timeline that says why a row falls short of its prediction or of another system.
        engine.profile = True
        engine.backward(engine(ids, labels=ids).loss)
        engine.step()
        system = "ratel_streamed" if resident is False else "ssd" if ssd_dir else "ratel"
        label = f"{system}, {layers} layers, batch {batch}"
        with open(Path(args.out) / "profiles.txt", "a") as f:
            f.write(f"==== {label}\n{ratel.summary(plan, engine.last_step)}\n")
        disk = measured_disk(engine.last_step)
        if disk is not None:      # the SSD row's why: the disk's rate while busy, or its idle time
            out["profiled"] = {"wall": engine.last_step.wall, **disk}
    engine.close()
    del engine
    gc.collect()
    return out


def ssd_host_budget(model, ids, gpu: int, ssd_dir, device, hardware, fraction: float) -> int:
    """The host budget under which about ``fraction`` of the optimizer states go to the SSD.

    What everything on the host needs (planned with a roomy host) less that share of the states is not enough
    alone: with a roomy host the planner also keeps saved activations there, and under the smaller budget it
    recomputes them instead, so the states it was meant to push out still fit (the H200's 32-layer row,
    2026-12-05: nothing went to the SSD). So the budget is lowered by the shortfall, plan by plan (explained,
    nothing allocated), until the SSD holds at least 90 % of the share."""
    def plan(host):
        return ratel.explain(model, ratel.Budget(gpu=gpu, host=host, ssd_dir=ssd_dir), (ids,), device=device,
                             hardware=hardware)
    roomy = plan(1 << 40)
    states = sum(host_entries(roomy, "fp32 master + adam states:") + host_entries(roomy, "adam states:"))
    target = int(fraction * states)
    host = roomy.memory.host_total - target
    for _ in range(6):
        try:
            on_ssd = plan(host).memory.ssd_total
        except BudgetError as e:
            if e.tier != "host":
                raise
            return e.needed      # the SSD's staging buffers take more than the states freed: the least it takes
        if on_ssd >= 0.9 * target:
            break
        host -= target - on_ssd
    return host


def scratch(args) -> Path:
    """The folder under --ssd-dir the disk and ssd rows write to; removed after each (a row killed at its
    timeout leaves its swap files behind)."""
    return Path(args.ssd_dir) / "throughput-swap"


def run_row(args) -> None:
    """In a row's own process: measure ``args.row`` and write its JSON to ``args.result``."""
    row = json.loads(args.row)
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        row.update(card=torch.cuda.get_device_name(), device_memory=total)
        if row["system"] != "resident":
            torch.cuda.set_per_process_memory_fraction(ratel.parse_bytes(args.cap) / total)
            row["cap"] = args.cap
    else:
        row.update(card="CPU (smoke: host memory stands in for the GPU)")
    row["params"] = gpt_config(args, row["layers"]).num_parameters()
    row["status"] = "ok"

    def measured(out: dict) -> None:     # the timed steps, kept should the process not finish
        Path(args.result).write_text(json.dumps({**row, **out, "rss": max_rss()}))
    try:
        if row["system"] == "resident":
            row.update(resident_row(args, row["batch"], device, dtype))
        elif row["system"] in ("ratel", "ratel_streamed"):
            row.update(ratel_row(args, row["layers"], row["batch"], device, dtype,
                                 resident=False if row["system"] == "ratel_streamed" else None, measured=measured))
        elif row["system"] == "ssd":
            scratch(args).mkdir(parents=True, exist_ok=True)
            row.update(ratel_row(args, row["layers"], row["batch"], device, dtype, ssd_dir=str(scratch(args)),
                                 measured=measured))
        elif row["system"] == "disk":
            scratch(args).mkdir(parents=True, exist_ok=True)
            row["probe"] = (16 << 20) if args.smoke else (1 << 30)      # bytes a request, as ssd_lane.py
            row["disk"] = measure_disk([str(scratch(args))], row["probe"])
            if ratel.parse_bytes(args.sustained) > 0:
                # A virtual disk can take a short probe's few GiB faster than it sustains them: on the H200
                # (2026-12-05) the 1 GiB probe read and wrote at once at 2.08-2.22 GB/s, and the SSD row's
                # swapper moved 1.83 over its 45 s step. So also the rates over as many bytes as a row moves.
                requests = max(1, ratel.parse_bytes(args.sustained) // row["probe"])
                row["sustained"] = measure_disk([str(scratch(args))], row["probe"], requests=requests, repeats=1)
                row["sustained_bytes"] = requests * row["probe"]
    except torch.OutOfMemoryError as e:
        row.update(status="OOM", note=str(e).splitlines()[0][:200])
    row["rss"] = max_rss()
    if device.type == "cuda":
        row.update(reserved=torch.cuda.max_memory_reserved(), allocated=torch.cuda.max_memory_allocated())
    Path(args.result).write_text(json.dumps(row))


# ---------------------------------------------------------------------------------------------------------
# The run: every row in a process of its own
# ---------------------------------------------------------------------------------------------------------
def start(cmd: list[str], env: dict | None = None) -> subprocess.Popen:
    # Its own process group, so a timeout ends the row and every process it started.
    return subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> str | None:
    """Wait for ``proc``; None when it exited with 0, else why not."""
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return f"timeout after {timeout:.0f} s"
    return None if code == 0 else f"exit code {code}" + (" (killed: out of host memory?)" if code == -9 else "")


class Runner:
    """Runs rows one after another within the time budget and writes each to rows.jsonl as it ends."""

    def __init__(self, args, argv: list[str], tmp: str):
        self.args, self.argv, self.tmp = args, argv, tmp
        self.deadline = time.monotonic() + args.time_budget if args.time_budget else float("inf")
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.rows_path = self.out / "rows.jsonl"
        self.rows_path.write_text("")
        (self.out / "profiles.txt").write_text("")     # the Ratel rows' profiled steps append to it
        self.rows: list[dict] = []

    def timeout(self) -> float:
        return min(self.args.row_timeout, self.deadline - time.monotonic())

    def add(self, row: dict) -> None:
        row["setup"] = setup(self.args)
        self.rows.append(row)
        with self.rows_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"== {row_line(row)}", flush=True)

    def row(self, system: str, layers: int, batch: int) -> None:
        # The size goes in here, not only in the row's own process: a row that dies still has a model to name.
        spec = {"system": system, "layers": layers, "batch": batch,
                "params": gpt_config(self.args, layers).num_parameters()}
        if self.timeout() < 30:
            return self.add({**spec, "status": "skipped", "note": "time budget"})
        print(f"== {system}, {layers} layers, batch {batch}", flush=True)
        result = Path(self.tmp) / "row.json"
        result.unlink(missing_ok=True)
        proc = start([sys.executable, __file__, *self.argv, "--row", json.dumps(spec), "--result", str(result)])
        failed = finish(proc, self.timeout())
        if not result.exists():
            return self.add({**spec, "status": "failed", "note": failed or "no result written"})
        row = json.loads(result.read_text())
        if failed:      # its timed steps were written before the profiled step and the close
            row["note"] = "; ".join(filter(None, [row.get("note"), f"{failed} after the timed steps"]))
        self.add(row)

    def deepspeed(self, mode: str, harness: Path, port: int) -> None:
        """One ds_bench.py process for every batch of ``mode``; its JSON lines become rows."""
        args = self.args
        timeout = self.timeout()
        if timeout < 60:
            for b in args.batches:
                self.add({"system": mode, "layers": args.layers, "batch": b, "status": "skipped",
                          "note": "time budget"})
            return
        print(f"== {mode}, {args.layers} layers, batches {args.batches}", flush=True)
        folder = self.out / "deepspeed"
        folder.mkdir(exist_ok=True)
        results = folder / "results.jsonl"
        before = len(results.read_text().splitlines()) if results.exists() else 0
        proc = start([sys.executable, str(harness / "ds_bench.py"), "--mode", mode, "--layers", str(args.layers),
                      "--hidden", str(args.hidden), "--heads", str(args.heads), "--seq", str(args.seq),
                      "--vocab", str(args.vocab), "--batches", ",".join(map(str, args.batches)),
                      "--warmup", str(args.warmup), "--steps", str(args.steps),
                      "--cap-gib", str(ratel.parse_bytes(args.cap) / 2**30), "--out", str(folder),
                      "--time-budget", str(timeout - 15)], env=deepspeed_env(port))
        failed = finish(proc, timeout)
        lines = results.read_text().splitlines()[before:] if results.exists() else []
        rows = {r["batch"]: r for r in (deepspeed_row(json.loads(line), args) for line in lines)}
        stopped = next((r for r in rows.values() if r["status"] != "ok"), None)
        for b in args.batches:
            if b in rows:
                self.add(rows[b])
            else:
                why = (f"not run: the mode stopped at batch {stopped['batch']} ({stopped['status']})" if stopped
                       else f"not run: {failed or 'no result'}")
                self.add({"system": mode, "layers": args.layers, "batch": b, "status": "failed", "note": why})


def deepspeed_env(port: int) -> dict:
    """What run_device.sh sets for the harness: the accelerator, a shared JIT build folder, and an arch list
    DeepSpeed's JIT parser takes (it rejects the '9.0a' some images set)."""
    env = {"MASTER_PORT": str(port), "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cuda"),
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", "/tmp/torch_ext"),
           "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 4))}
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch:
        env["TORCH_CUDA_ARCH_LIST"] = " ".join(a.rstrip("a") for a in arch.replace(";", " ").split())
    return env


def deepspeed_row(r: dict, args) -> dict:
    """A line of ds_bench.py's results.jsonl as a row; TFLOPS re-counted with every parameter in N."""
    row = {"system": r["mode"], "layers": r["layers"], "batch": r["B"], "card": r.get("device"),
           "cap": args.cap, "params": gpt_config(args, r["layers"]).num_parameters(),
           "status": r["status"], "note": r.get("note", "")}
    if r["status"] == "ok":
        row.update(step=r["step_s"], range=[min(r["step_times"]), max(r["step_times"])], losses=r["losses"],
                   tflops=flops(args, r["layers"], r["B"]) / r["step_s"] / 1e12,
                   rss=int(r["maxrss_gib"] * 2**30), reserved=int(r["peak_reserved_gib"] * 2**30),
                   allocated=int(r["peak_alloc_gib"] * 2**30))
    return row


def deepspeed_missing(harness: Path) -> str | None:
    """Why the DeepSpeed rows cannot run here, or None."""
    if not (harness / "ds_bench.py").exists():
        return f"no ds_bench.py in {harness} (--harness)"
    check = subprocess.run([sys.executable, "-c", "import deepspeed"], capture_output=True, text=True)
    if check.returncode:
        return "deepspeed does not import: " + (check.stderr.strip().splitlines() or ["?"])[-1]
    return None


def measure(args, argv: list[str]) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        return run_rows(args, Runner(args, argv, tmp))


def run_rows(args, runner: Runner) -> list[dict]:
    """The resident bound, Ratel, DeepSpeed's two modes, the disk and the SSD rows, in this order."""
    systems = args.systems
    harness = ROOT / args.harness
    no_deepspeed = None
    if set(systems) & set(DEEPSPEED):
        no_deepspeed = "--smoke runs no DeepSpeed" if args.smoke else deepspeed_missing(harness)
    builder = None
    if set(systems) & set(DEEPSPEED) and not no_deepspeed:
        # DeepSpeed JIT-builds CPUAdam once; as run_device.sh does, while the resident bound uses the GPU.
        builder = start([sys.executable, str(harness / "ds_bench.py"), "--mode", "build_ops"], deepspeed_env(29500))
    if "resident" in systems:
        for b in args.batches:
            runner.row("resident", args.layers, b)
    if builder is not None:
        why = finish(builder, max(runner.timeout(), 1))
        if why:
            no_deepspeed = f"building DeepSpeed's CPUAdam failed: {why}"
    for system in ("ratel", "ratel_streamed"):
        if system in systems:
            for b in args.batches:
                runner.row(system, args.layers, b)
    for port, mode in enumerate(DEEPSPEED, start=29501):
        if mode not in systems:
            continue
        if no_deepspeed:
            print(f"== {mode} skipped: {no_deepspeed}", flush=True)
            for b in args.batches:
                runner.add({"system": mode, "layers": args.layers, "batch": b, "status": "skipped",
                            "note": no_deepspeed})
            continue
        runner.deepspeed(mode, harness, port)
    if {"disk", "ssd"} & set(systems):
        if not args.ssd_dir:
            print("== disk and ssd rows skipped: no --ssd-dir", flush=True)
        else:
            if "disk" in systems:
                runner.row("disk", 0, 0)
                shutil.rmtree(scratch(args), ignore_errors=True)
            if "ssd" in systems:
                for layers in args.ssd_layers:
                    for b in args.ssd_batches:
                        runner.row("ssd", layers, b)
                        shutil.rmtree(scratch(args), ignore_errors=True)
    print(f"rows in {runner.rows_path}", flush=True)
    return runner.rows


# ---------------------------------------------------------------------------------------------------------
# Table and plot
# ---------------------------------------------------------------------------------------------------------
def size(n) -> str:
    """Bytes as format_bytes writes them; empty when not measured."""
    return format_bytes(n) if n else ""


def tf(x: float) -> str:
    """TFLOPS with one decimal, or three significant digits below 1 (the CPU smoke's)."""
    return f"{x:.1f}" if x >= 1 else f"{x:.3g}"


def row_line(r: dict) -> str:
    what = f"{r['system']} L={r['layers']} B={r['batch']}"
    if r["status"] != "ok":
        return f"{what}: {r['status']} {r.get('note', '')}"
    if r["system"] == "disk":
        return f"{what}: " + ", ".join(f"{k} {v / 1e9:.2f} GB/s" for k, v in r["disk"].items())
    return (f"{what}: step {r['step']:.3f} s, {tf(r['tflops'])} model TFLOPS"
            + (f", predicted {predicted_cell(r)}" if "predicted" in r else "") + f", host RSS {size(r['rss'])}")


def predicted_cell(r: dict) -> str:
    return f"{r['predicted']:.3f} s ({r['predicted'] / r['step']:.2f})" if "predicted" in r else ""


def table(rows: list[dict], args) -> str:
    """The Markdown table of ``rows``; the model and cap from the rows themselves (``args`` if they have none)."""
    args = argparse.Namespace(**rows[0]["setup"]) if rows and "setup" in rows[0] else args
    main = [r for r in rows if r["system"] in ("resident", "ratel", "ratel_streamed", *DEEPSPEED)]
    ssd = [r for r in rows if r["system"] == "ssd"]
    disk_row = next((r for r in rows if r["system"] == "disk" and r["status"] == "ok"), None)
    disk = disk_row["disk"] if disk_row else None
    card = next((r["card"] for r in rows if r.get("card")), "no card recorded")
    total = next((r["device_memory"] for r in rows if r.get("device_memory")), None)
    zero_inf = {r["batch"]: r["tflops"] for r in main if r["system"] == "zero3_cpu" and r["status"] == "ok"}
    n = gpt_config(args, args.layers).num_parameters()
    lines = [f"\n## Throughput: GPU-resident PyTorch, Ratel, ZeRO-Offload and ZeRO-Infinity under a {args.cap} cap "
             f"({datetime.date.today()}, {card})\n",
             f"Card: {card}" + (f" ({format_bytes(total)}), every process but the resident bound's capped at "
                                f"{args.cap} with `set_per_process_memory_fraction`" if total else "")
             + f"; Ratel's GPU budget is {format_bytes(ratel.parse_bytes(args.cap) - (1 << 30))}"
             + (f", host budget {args.host}" if args.host else "") + f". GPT {args.layers}L h={args.hidden} "
             f"{args.heads} heads vocab {args.vocab} untied ({n / 1e9:.2f}B), seq {args.seq} "
             "(`benchmarks/throughput.py`). Each row in its own process; median of the timed steps after the "
             "warm-up. Model TFLOPS = (6 N tokens + 12 L h s^2 B) / step, N every parameter, recompute not "
             "counted, for every system. The resident bound ran uncapped with as many layers as fit (of L, L/2, "
             "...): its TFLOPS per layer, its step scaled to the full model. DeepSpeed: "
             "`shared/baselines/deepspeed/ds_bench.py` (per-block checkpointing, bf16).\n",
             "| system | batch | step (range) | model TFLOPS | vs ZeRO-Infinity | predicted (/ measured) | host RSS "
             "| GPU max reserved | note |", "|---|---|---|---|---|---|---|---|---|"]
    for r in main:
        name = TITLES[r["system"]]
        if r["status"] != "ok":
            lines.append(f"| {name} | {r['batch']} | {r['status']} | | | | | | {r.get('note', '')} |")
            continue
        ratio = f"{r['tflops'] / zero_inf[r['batch']]:.2f}x" if r["batch"] in zero_inf else ""
        lines.append(f"| {name} | {r['batch']} | {r['step']:.3f} s ({r['range'][0]:.3f}-{r['range'][1]:.3f}) | "
                     f"{tf(r['tflops'])} | {ratio} | {predicted_cell(r)} | {size(r.get('rss'))} | "
                     f"{size(r.get('reserved'))} | {r.get('note', '')} |")
    batches = sorted({r["batch"] for r in main})
    if batches:
        lines += ["", "Model TFLOPS by batch:", "",
                  "| system | " + " | ".join(f"B={b}" for b in batches) + " |", "|---|" + "---|" * len(batches)]
        for system in ("resident", "ratel", "ratel_streamed", *DEEPSPEED):
            by_batch = {r["batch"]: r for r in main if r["system"] == system}
            if by_batch:
                cells = [tf(by_batch[b]['tflops']) if b in by_batch and by_batch[b]["status"] == "ok"
                         else by_batch[b]["status"] if b in by_batch else "" for b in batches]
                lines.append(f"| {TITLES[system]} | " + " | ".join(cells) + " |")
    if ssd:
        sustained = disk_row.get("sustained") if disk_row else None
        lines += ["", "Optimizer states partly on SSD (`--ssd-dir`): raw disk rates measured in this run "
                  + (f"({format_bytes(disk_row['probe'])} O_DIRECT requests: {rates(disk)})" if disk
                     else "(not measured)")
                  + (f", and sustained over {format_bytes(disk_row['sustained_bytes'])} each way, two requests "
                     f"in flight: {rates(sustained)}" if sustained else "")
                  + "; bytes are the swapper's per timed step; roofline = max(read / read rate, written / write "
                  "rate, both / both-at-once rate)" + (", at the short probe's rates and at the sustained ones"
                                                        if sustained else "")
                  + "; the profiled step's SSD busy time is while either channel moved data (write-backs still "
                  "running when the step returned are not counted).", "",
                  "| model | batch | step (range) | model TFLOPS | predicted (/ measured) | states on SSD | SSD read + "
                  "written per step | roofline | roofline / step | "
                  + ("sustained roofline | its / step | " if sustained else "")
                  + "profiled step: SSD busy (rate while busy) | host RSS |",
                  "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if sustained else "") + "---|---|"]
        for r in ssd:
            model = f"{r['layers']}L ({r['params'] / 1e9:.2f}B)"
            if r["status"] != "ok":
                lines.append(f"| {model} | {r['batch']} | {r['status']} | | | | | | | | "
                             + ("| | " if sustained else "") + f"{r.get('note', '')} |")
                continue
            moved = f"{r['read'] / 1e9:.2f} + {r['written'] / 1e9:.2f} GB" if "read" in r else "none"
            cells = []
            for measured in ([disk, sustained] if sustained else [disk]):
                bound = roofline(r["read"], r["written"], measured) if measured and "read" in r else None
                cells.append(f"{bound:.2f} s | {bound / r['step']:.2f}" if bound is not None else " | ")
            lines.append(f"| {model} | {r['batch']} | {r['step']:.2f} s ({r['range'][0]:.2f}-{r['range'][1]:.2f}) | "
                         f"{tf(r['tflops'])} | {predicted_cell(r)} | "
                         + (f"{r['states_on_ssd']} of {r['groups']} groups" if "groups" in r else r.get("note", "none"))
                         + f" | {moved} | " + " | ".join(cells) + f" | {busy_cell(r)} | {size(r.get('rss'))} |")
    return "\n".join(lines) + "\n"


def busy_cell(row: dict) -> str:
    """How much of the profiled step the SSD lane moved data, and at what rate then: a row short of its roofline
    with the disk busy throughout is the disk's rate; one with idle time is the runtime's."""
    p = row.get("profiled")
    if not p or not p["busy"]:
        return ""
    return f"{p['busy']:.2f} s of {p['wall']:.2f} s ({(p['read'] + p['written']) / p['busy'] / 1e9:.2f} GB/s)"


def rates(disk: dict) -> str:
    return f"read {disk['read'] / 1e9:.2f}, write {disk['write'] / 1e9:.2f}, both at once {disk['both'] / 1e9:.2f} GB/s"


def plot(rows: list[dict], path: Path) -> Path | None:
    """Model TFLOPS against batch size, one line per system (Figure 5 of the ZeRO-Infinity / Ratel papers)."""
    try:
        from ratel.tools.plots import _pyplot, _save
        plt = _pyplot()
    except ImportError:
        print("no plot: matplotlib does not import", flush=True)
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = [(TITLES[s], [r for r in rows if r["system"] == s])
              for s in ("resident", "ratel", "ratel_streamed", *DEEPSPEED)]
    series += [(f"{TITLES['ssd']}, {p / 1e9:.1f}B", [r for r in rows if r["system"] == "ssd" and r["params"] == p])
               for p in sorted({r["params"] for r in rows if r["system"] == "ssd"})]
    for label, group in series:
        ok = sorted((r["batch"], r["tflops"]) for r in group if r["status"] == "ok")
        if ok:
            ax.plot(*zip(*ok), marker="o", ls="--" if label.startswith("GPU-resident") else "-", label=label)
    ax.set_xscale("log", base=2)
    batches = sorted({r["batch"] for r in rows if r["status"] == "ok" and r["system"] in TITLES})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.minorticks_off()
    ax.set_xlabel("batch size (sequences)")
    ax.set_ylabel("model TFLOPS")
    card = next((r["card"] for r in rows if r.get("card")), "")
    ax.set_title(f"Throughput against batch size ({card})", fontsize=10)
    ax.grid(color="#E0E0E0", lw=0.6)
    if ax.get_lines():      # a run whose rows all failed draws empty axes, without a legend of nothing
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def report(rows: list[dict], args) -> None:
    text = table(rows, args)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text)
    picture = plot(rows, out / "throughput.png")
    print(f"wrote {out / 'table.md'}" + (f", {picture}" if picture else ""), flush=True)
    if args.append_results:
        with Path(args.results).open("a") as f:
            f.write(text)
        print(f"appended the table to {args.results}", flush=True)


def main() -> None:
    argv = sys.argv[1:]
    args = parse_args(argv)
    if args.row:
        return run_row(args)
    if args.report:
        rows = [json.loads(line) for path in args.report for line in Path(path).read_text().splitlines() if line]
    else:
        rows = measure(args, argv)
    report(rows, args)


if __name__ == "__main__":
    main()
