"""benchmarks/throughput.py: the --smoke run on the CPU end to end (every row in its own process, rows.jsonl,
the table), and DeepSpeed's rows through a stand-in for its harness (DeepSpeed is not installed here)."""
import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import throughput  # noqa: E402  (benchmarks/throughput.py)
from helpers import subprocess_env  # noqa: E402


def test_smoke_run_writes_a_row_per_configuration_and_the_table(tmp_path):
    out = tmp_path / "out"
    env = subprocess_env(ROOT)
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--smoke", "--batches", "1",
                           "--out", str(out), "--ssd-dir", str(tmp_path / "ssd")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    by_system = {r["system"]: r for r in rows}
    assert [r["system"] for r in rows] == ["resident", "ratel", "ratel_streamed", "zero_offload", "zero3_cpu", "disk",
                                           "ssd"]
    for system in ("resident", "ratel", "ratel_streamed", "ssd", "disk"):
        assert by_system[system]["status"] == "ok", proc.stdout[-3000:]
    for system in ("resident", "ratel", "ratel_streamed", "ssd"):
        r = by_system[system]
        assert r["step"] > 0 and r["tflops"] > 0 and r["rss"] > 0
    assert by_system["ratel"]["predicted"] > 0
    assert by_system["resident"]["measured_layers"] == 2
    ssd = by_system["ssd"]
    assert ssd["layers"] == 3 and ssd["states_on_ssd"] > 0 and ssd["read"] > 0 and ssd["written"] > 0
    # Its profiled step: how long the SSD lane moved data, and what (every read of the step is in it).
    profiled = ssd["profiled"]
    assert 0 < profiled["busy"] <= profiled["wall"] and profiled["read"] == pytest.approx(ssd["read"], rel=0.01)
    assert set(by_system["disk"]["disk"]) == {"read", "write", "both"}
    assert set(by_system["disk"]["sustained"]) == {"read", "write", "both"}
    for mode in throughput.DEEPSPEED:
        assert by_system[mode]["status"] == "skipped" and "DeepSpeed" in by_system[mode]["note"]
    assert "skipped: --smoke runs no DeepSpeed" in proc.stdout
    text = (out / "table.md").read_text()
    assert text in proc.stdout
    assert "| Ratel | 1 |" in text and "| Ratel, every group streamed (resident=False) | 1 |" in text and "| GPU-resident PyTorch (bound) | 1 |" in text and "| 3L (" in text
    assert "roofline / step" in text and "sustained roofline" in text and "Card: CPU" in text
    busy = f"{profiled['busy']:.2f} s of {profiled['wall']:.2f} s"
    assert "profiled step: SSD busy (rate while busy)" in text and busy in text
    # Every Ratel row's profiled step: the summary with measured figures beside the predicted ones.
    profiles = (out / "profiles.txt").read_text()
    for label in ("ratel, 2 layers, batch 1", "ratel_streamed, 2 layers, batch 1", "ssd, 3 layers, batch 1"):
        assert f"==== {label}\n" in profiles
    assert profiles.count("measured     step") == 3
    if importlib.util.find_spec("matplotlib"):
        assert (out / "throughput.png").stat().st_size > 0


FAKE_HARNESS = textwrap.dedent("""
    # Stands in for ds_bench.py: takes its options, writes its JSON lines; an OOM from batch 4 on.
    import argparse, json, os
    p = argparse.ArgumentParser()
    for name in ("--mode", "--layers", "--hidden", "--heads", "--seq", "--vocab", "--batches", "--warmup",
                 "--steps", "--cap-gib", "--out", "--time-budget"):
        p.add_argument(name, required=True)
    a = p.parse_args()
    assert os.environ["MASTER_PORT"] and os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0"
    with open(os.path.join(a.out, "results.jsonl"), "a") as f:
        for b in map(int, a.batches.split(",")):
            r = dict(mode=a.mode, layers=int(a.layers), B=b, device="cpu")
            if b >= 4:
                f.write(json.dumps(dict(r, status="OOM", note="CUDA out of memory")) + "\\n")
                break
            f.write(json.dumps(dict(r, status="ok", step_s=0.5 * b, step_times=[0.5 * b] * 2, losses=[1.0, 1.0],
                                    maxrss_gib=1.0, peak_reserved_gib=2.0, peak_alloc_gib=1.5)) + "\\n")
""")


def test_deepspeed_rows_come_from_the_harness_and_stop_at_its_first_oom(tmp_path, monkeypatch, capsys):
    harness = tmp_path / "harness"
    harness.mkdir()
    assert "no ds_bench.py" in throughput.deepspeed_missing(harness)
    (harness / "ds_bench.py").write_text(FAKE_HARNESS)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    args = throughput.parse_args(["--smoke", "--batches", "1", "2", "4", "8", "--out", str(tmp_path / "out")])
    runner = throughput.Runner(args, [], str(tmp_path))
    runner.deepspeed("zero3_cpu", harness, 29502)
    rows = runner.rows
    assert [(r["batch"], r["status"]) for r in rows] == [(1, "ok"), (2, "ok"), (4, "OOM"), (8, "failed")]
    assert "stopped at batch 4 (OOM)" in rows[3]["note"]
    # TFLOPS counted as for Ratel's rows: every parameter in N.
    assert rows[1]["tflops"] == throughput.flops(args, args.layers, 2) / 1.0 / 1e12
    assert len((tmp_path / "out" / "rows.jsonl").read_text().splitlines()) == 4
    ratel_row = dict(rows[1], system="ratel", step=0.25, tflops=2 * rows[1]["tflops"], predicted=0.3)
    text = throughput.table(rows + [ratel_row], args)
    assert "| Ratel | 2 | 0.250 s" in text and "| 2.00x |" in text and "0.300 s (1.20)" in text
    assert "| ZeRO-Infinity (CPU) | 8 | failed |" in text


def test_an_ssd_row_whose_process_dies_is_named_by_its_model_in_the_table_and_the_plot(tmp_path, monkeypatch):
    """On the H100 an SSD row ran past its timeout after its profiled step; the report then failed with a
    KeyError on the model's size, losing the table of every row."""
    args = throughput.parse_args(["--smoke", "--ssd-dir", str(tmp_path), "--out", str(tmp_path / "out")])
    runner = throughput.Runner(args, [], str(tmp_path))
    monkeypatch.setattr(throughput, "start", lambda command: None)
    monkeypatch.setattr(throughput, "finish", lambda proc, timeout: "timeout after 300 s")
    runner.row("ssd", 4, 2)
    row, = runner.rows
    assert row["status"] == "failed" and row["params"] == throughput.gpt_config(args, 4).num_parameters()
    text = throughput.table(runner.rows, args)
    assert f"| 4L ({row['params'] / 1e9:.2f}B) | 2 | failed |" in text and "timeout after 300 s" in text
    throughput.plot(runner.rows, tmp_path / "plot.png")


def test_a_row_that_times_out_after_its_timed_steps_keeps_them(tmp_path, monkeypatch):
    """The row's process writes its timed steps before the profiled step and the close (on the H100, a 32-layer
    SSD row at ~50 s a step ran past its timeout there): a timeout then keeps the steps, saying so."""
    args = throughput.parse_args(["--smoke", "--out", str(tmp_path / "out")])
    runner = throughput.Runner(args, [], str(tmp_path))

    def start(command):
        spec = json.loads(command[command.index("--row") + 1])
        result = Path(command[command.index("--result") + 1])
        result.write_text(json.dumps({**spec, "status": "ok", "step": 2.0, "range": [2.0, 2.1], "tflops": 1.0,
                                      "predicted": 1.9, "rss": 1 << 30}))

    monkeypatch.setattr(throughput, "start", start)
    monkeypatch.setattr(throughput, "finish", lambda proc, timeout: "timeout after 300 s")
    runner.row("ratel", 2, 1)
    row, = runner.rows
    assert row["status"] == "ok" and row["step"] == 2.0
    assert row["note"] == "timeout after 300 s after the timed steps"
    assert "| Ratel | 1 | 2.000 s" in throughput.table(runner.rows, args)


def test_the_row_process_writes_its_timed_steps_before_profiling(tmp_path, monkeypatch):
    """ratel_row hands its timed result over before the profiled step: what the parent keeps if the rest
    outlasts the timeout."""
    args = throughput.parse_args(["--smoke", "--out", str(tmp_path), "--steps", "1", "--warmup", "0"])
    order = []
    monkeypatch.setattr(throughput.ratel, "summary", lambda plan, step=None: order.append("profiled") or "")
    out = throughput.ratel_row(args, 2, 1, throughput.torch.device("cpu"), throughput.torch.float32,
                               measured=lambda result: order.append(("measured", result["step"])))
    assert order == [("measured", out["step"]), "profiled"]


def test_the_ssd_rows_host_budget_sends_the_asked_share_of_states_to_the_ssd_when_the_planner_trades_activations(
        monkeypatch):
    """On the H200 (2026-12-05) --ssd-states 0.5 put nothing on the SSD: the roomy plan's host total held saved
    activations, and under 'roomy less half the states' the planner recomputed them and kept every state.
    A stand-in planner that trades activations first: host holds states S + copies C, then activations up to A;
    what does not fit of S goes to the SSD."""
    S, C, A = 80 << 30, 14 << 30, 60 << 30
    GiB = 1 << 30

    class Memory:
        def __init__(self, host):
            kept = min(S, max(0, host - C))
            self.ssd_total = S - kept
            self.host_total = C + kept + max(0, min(A, host - C - S))
            self.host_bytes = [("compute copy:blocks", C), ("fp32 master + adam states:blocks", kept)]

    class Plan:
        def __init__(self, host):
            self.memory = Memory(host)

    def explain(model, budget, inputs, device=None, hardware=None):
        if budget.host < C + GiB:
            raise throughput.BudgetError("host too small", tier="host", needed=C + GiB, budget=budget.host)
        return Plan(budget.host)

    monkeypatch.setattr(throughput.ratel, "explain", explain)
    host = throughput.ssd_host_budget(None, None, 20 * GiB, "/tmp", "cpu", None, 0.5)
    assert Plan(host).memory.ssd_total >= 0.9 * S / 2
    assert Plan(host).memory.ssd_total <= 1.1 * S / 2       # no more than asked: the row measures that share


def test_the_sustained_disk_measurement_gives_the_three_rates_and_leaves_no_file(tmp_path):
    """The roofline of an SSD row moving tens of GB a step, at the rates the disk keeps for that long."""
    rates = throughput.measure_disk([str(tmp_path)], 1 << 20, requests=8, repeats=1)
    assert set(rates) == {"read", "write", "both"} and all(v > 0 for v in rates.values())
    assert list(tmp_path.iterdir()) == []
