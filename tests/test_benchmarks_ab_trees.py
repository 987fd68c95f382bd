"""benchmarks/ab_trees.py --smoke on the CPU: two trees, each in its own process importing its own ratel,
take steps in turn; the same code trains the same losses in both, and the table states the ratio."""
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import ab_trees  # noqa: E402  (benchmarks/ab_trees.py)


def test_two_trees_take_steps_in_turn_each_with_its_own_ratel(tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(ROOT / "ratel", copy / "ratel", ignore=shutil.ignore_patterns("__pycache__"))
    result = ab_trees.main(["--smoke", "--rounds", "2", "--trees", str(ROOT), str(copy),
                            "--labels", "here", "copy"])
    assert result["packages"] == [str(ROOT / "ratel"), str(copy / "ratel")]
    a, b = result["losses"]
    assert len(a) == len(b) == 1 + 2 * 2 and a == b          # warm-up, then two steps a round
    assert len(result["ratios"]) == 2 and all(r > 0 for r in result["ratios"])
    low, high = result["ratio_interval"]
    assert low <= result["ratio_mean"] <= high
    text = capsys.readouterr().out
    assert "| here |" in text and "| copy |" in text and "per round" in text and "equal in both trees" in text


def test_losses_that_differ_in_their_last_bits_are_printed_so_that_they_read_different():
    """The H200's A/B printed 'first differ at step 0: 11.6489 against 11.6489'."""
    args = ab_trees.parse_args(["--smoke"])
    a, b = [11.648912, 11.2], [11.648913, 11.2]
    result = {"trees": ["A", "B"], "medians": [1.0, 1.0], "ranges": [[1.0, 1.0]] * 2, "predicted": [1.0, 1.0],
              "losses": [a, b], "ratio_mean": 1.0, "ratio_interval": [0.9, 1.1]}
    text = ab_trees.table(result, args)
    assert "first differ at step 0: 11.648912 against 11.648913; largest relative difference 8.6e-08." in text
