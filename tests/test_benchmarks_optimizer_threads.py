"""benchmarks/optimizer_threads.py on the CPU: a row per thread count, the losses the same bits for each."""
import re
import subprocess
import sys
from pathlib import Path

from helpers import subprocess_env

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "optimizer_threads.py"


def test_every_thread_count_has_a_row_and_trains_the_same_losses():
    env = subprocess_env(SCRIPT.parents[1])
    out = subprocess.run([sys.executable, str(SCRIPT), "--steps", "1", "--rounds", "1"], capture_output=True,
                         text=True, timeout=300, env=env).stdout
    rows = re.findall(r"^\| (\d+) \| [\d.]+ ms \| ([\d.]+) \| (\w+) \|$", out, re.M)
    assert rows, out
    assert rows[0][1] == "1.00" and all(same == "yes" for _, _, same in rows), out
