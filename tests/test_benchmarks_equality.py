"""benchmarks/equality_at_scale.py on the CPU: a tiny GPT whose head loss is chunked, every mode's losses
equal to plain PyTorch's (the script is what a GPU session runs to compare Ratel with PyTorch at scale)."""
import re
import subprocess
import sys
from pathlib import Path

from helpers import subprocess_env

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "equality_at_scale.py"


def test_every_mode_prints_the_losses_of_plain_pytorch():
    env = subprocess_env(SCRIPT.parents[1])
    out = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--layers", "2", "--hidden", "64",
                          "--heads", "4", "--vocab", "512", "--seq", "512", "--batch", "4", "--cap", "2GiB",
                          "--check-targets"], capture_output=True, text=True, timeout=300, env=env).stdout
    losses = dict(re.findall(r"^\[(\w+)\] losses (.+) \(", out, re.M))
    assert set(losses) == {"ref", "streamed", "resident", "recompute"}, out
    assert len(losses["ref"].split()) == 3
    for mode in ("streamed", "resident", "recompute"):
        assert losses[mode] == losses["ref"], (mode, out)
    assert "groups on the GPU: ('embed'" in out         # the resident rows kept a group there
    assert "head loss backward: targets 0..511 of 512" in out      # the chunked loss ran, and was checked
