"""benchmarks/head_loss.py --smoke on the CPU: the three variants of the head's loss run forward and backward
on the same inputs and agree with eager PyTorch (fp32 here: to rounding)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import head_loss  # noqa: E402  (benchmarks/head_loss.py)

import ratel.ir.losses as losses  # noqa: E402


def test_smoke_times_every_variant_and_they_agree_with_eager(monkeypatch):
    aligns = []
    padded = losses._padded
    monkeypatch.setattr(losses, "_padded", lambda w, b, rows: aligns.append(rows) or padded(w, b, rows))
    text = head_loss.main(["--smoke"])
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    assert [r.split(" | ")[0] for r in rows] == ["| eager PyTorch", "| chunked, unpadded",
                                                 "| chunked, vocabulary padded to 64"]
    for row in rows:
        assert float(row.rstrip(" |").split(" | ")[-1]) < 1e-5, row
    assert set(aligns) == {0, 64 - 257 % 64}      # the unpadded variant pads nothing, the other to 320 rows
    assert losses.vocab_align is not None and losses.vocab_align.__name__ == "vocab_align"   # restored
