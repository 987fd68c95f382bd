"""benchmarks/ranks.py: the --smoke run on CPU ranks (gloo) end to end: one torchrun per rank count, rows
merged over the ranks, the table with the speed-up against one rank."""
import json
import subprocess
import sys
from pathlib import Path

from helpers import subprocess_env

ROOT = Path(__file__).resolve().parent.parent


def test_smoke_run_measures_one_and_two_ranks_and_writes_the_table(tmp_path):
    out = tmp_path / "out"
    env = subprocess_env(ROOT)
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ranks.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert [(r["ranks"], r["status"]) for r in rows] == [(1, "ok"), (2, "ok")], proc.stdout[-3000:]
    one, two = rows
    assert (one["global_batch"], two["global_batch"]) == (2, 4)       # each rank trains its own rows
    for r in rows:
        assert r["step"] > 0 and r["tflops"] > 0 and r["rss"] > 0 and len(r["losses"]) == 3
    # both ranks reported, and the row takes the slower one
    parts = [json.loads(p.read_text()) for p in out.glob("ranks2-rank*.json")]
    assert sorted(p["rank"] for p in parts) == [0, 1] and two["step"] == max(p["step"] for p in parts)
    text = (out / "table.md").read_text()
    assert text in proc.stdout and "| 1 | 2 |" in text and "| 2 | 4 |" in text and "1.00x" in text
