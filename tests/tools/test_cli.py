"""``python -m ratel plan|bench``: the summary prints, the plots are written, the benchmark runs on a CPU."""
import io
import os
import subprocess
import sys
from pathlib import Path

from ratel.cli import main

ROOT = Path(__file__).parents[2]


def run(argv):
    out = io.StringIO()
    return main(argv, out=out), out.getvalue()


def test_python_m_ratel_plan_prints_the_summary_and_writes_the_plots(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ratel", "plan", "--model", "gpt-tiny", "--budget", "1GiB", "--host", "8GiB",
         "--batch", "2", "--seq", "32", "--device", "cpu", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert result.returncode == 0, result.stderr
    for text in ("gpt-tiny: GPT: 4 layers", "Memory by tier", "Time by lane", "Per unit", "Per step",
                 "Predicted throughput", "tokens/s"):
        assert text in result.stdout
    for name in ("memory.png", "timeline.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")


def test_a_budget_too_small_exits_2_with_what_it_needs(tmp_path):
    code, out = run(["plan", "--model", "gpt-tiny", "--budget", "64KiB", "--host", "8GiB", "--seq", "32",
                     "--device", "cpu", "--no-plots"])
    assert code == 2
    assert "does not fit" in out and "at least" in out and "--budget" in out


def test_plan_lists_presets_and_refuses_what_it_cannot_plan(capsys):
    code, out = run(["plan", "--list"])
    assert code == 0 and "gpt-175b" in out and "llama-70b" in out
    code, _ = run(["plan", "--model", "gpt-tiny", "--seq", "4096", "--device", "cpu"])
    assert code == 1 and "learned positions" in capsys.readouterr().err


def test_bench_runs_a_tiny_shape_on_the_cpu(tmp_path):
    code, out = run(["bench", "--layers", "2", "--hidden", "64", "--heads", "2", "--vocab", "128", "--batch", "2",
                     "--seq", "32", "--steps", "2", "--device", "cpu", "--out", str(tmp_path)])
    assert code == 0
    assert "Ratel step" in out and "tokens/s" in out and "model TFLOPS" in out
    assert "CPU-resident PyTorch step" in out and "GPU" not in out.split("\n", 1)[1]   # a CPU run: no GPU labels
    assert "median" in out and "over 2 steps" in out and "Ratel / PyTorch step time" in out
    assert (tmp_path / "summary.txt").read_text().startswith("Ratel plan for cpu")
    assert (tmp_path / "timeline.png").exists()


def test_model_flops_follow_the_design_convention():
    from ratel.tools.bench import model_flops
    # 6·N·tokens + 12·L·h·s² per sequence
    assert model_flops(1000, 2, 64, batch=3, seq=16) == 6 * 1000 * 48 + 12 * 2 * 64 * 16 ** 2 * 3


def test_plan_shows_the_host_memory_of_accumulation_and_plans_clipping():
    base = ["plan", "--model", "gpt-tiny", "--budget", "1GiB", "--host", "8GiB", "--seq", "32", "--device", "cpu",
            "--no-plots"]
    code, plain = run(base)
    assert code == 0
    code, accumulating = run(base + ["--accumulate", "4", "--max-grad-norm", "1.0"])
    assert code == 0

    def host_gradients(text):
        row = next(line for line in text.splitlines() if line.strip().startswith("gradients"))
        return row.split()[-3:-1]        # the host column: value and unit

    assert host_gradients(plain) != host_gradients(accumulating)


def test_help_is_plain_text_and_every_bench_flag_says_what_it_is(capsys):
    import pytest
    for argv in (["--help"], ["plan", "--help"], ["bench", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        text = capsys.readouterr().out
        assert "``" not in text and "usage:" in text
    from ratel.cli import build_parser
    bench = build_parser()._subparsers._group_actions[0].choices["bench"]
    assert all(a.help for a in bench._actions), [a.dest for a in bench._actions if not a.help]


def test_plan_says_when_the_ssd_folder_does_not_exist_here(tmp_path):
    base = ["plan", "--model", "gpt-tiny", "--budget", "1GiB", "--host", "8GiB", "--seq", "32", "--device", "cpu",
            "--no-plots"]
    code, out = run(base + ["--ssd-dir", str(tmp_path / "missing")])
    assert code == 0 and "is not a folder on this machine" in out
    code, out = run(base + ["--ssd-dir", str(tmp_path)])
    assert code == 0 and "not a folder" not in out


def test_the_readme_175b_plan_fits_24_gib_and_says_the_ssd_bounds_its_step(tmp_path):
    """The scale issue's command: GPT-3's shape at 8 x 1024 on a 24 GiB card with 256 GiB of host memory."""
    code, out = run(["plan", "--model", "gpt-175b", "--budget", "24GiB", "--host", "256GiB", "--ssd-dir",
                     str(tmp_path), "--batch", "8", "--seq", "1024", "--no-plots"])
    assert code == 0, out
    step = next(line for line in out.splitlines() if "step time" in line)
    assert "SSD" in step
    assert "of 24.00 GiB budget" in out and "of 256.00 GiB budget" in out


def test_a_plan_for_cuda_keeps_the_first_groups_on_the_gpu_unless_no_resident():
    argv = ["plan", "--model", "gpt-tiny", "--budget", "1GiB", "--host", "8GiB", "--batch", "2", "--seq", "32",
            "--device", "cuda", "--hardware", "h100", "--no-plots"]
    code, out = run(argv)
    assert code == 0 and "kept on the GPU and updated there (embed" in out
    code, out = run(argv + ["--no-resident"])
    assert code == 0 and "kept on the GPU" not in out
