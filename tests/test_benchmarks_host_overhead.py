"""benchmarks/host_overhead.py on the CPU: a row for eager PyTorch and one per activation policy."""
import re
import subprocess
import sys
from pathlib import Path

from helpers import subprocess_env

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "host_overhead.py"


def test_the_table_has_eager_pytorch_and_every_policy_with_its_added_time_per_unit():
    env = subprocess_env(SCRIPT.parents[1])
    out = subprocess.run([sys.executable, str(SCRIPT), "--layers", "2", "--steps", "1"], capture_output=True,
                         text=True, timeout=300, env=env).stdout
    assert re.search(r"^\| eager PyTorch \+ torch.optim.AdamW \| \| [\d.]+ ms \| 1.00 \| \|$", out, re.M), out
    rows = re.findall(r"^\| Ratel, activations=(\w+) \| 4 \((\d)\) \| [\d.]+ ms \| [\d.]+ \| -?[\d.]+ ms \|$", out, re.M)
    assert [policy for policy, _ in rows] == ["recompute", "auto", "keep", "host"], out
    assert dict(rows)["recompute"] == "0" and dict(rows)["keep"] == "4"     # the policies planned what they say
