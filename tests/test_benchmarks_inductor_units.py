"""benchmarks/inductor_units.py --smoke on the CPU: a GPT block timed eager and compiled (aot_eager: the same
aten kernels, so its output and gradients are bitwise eager's, which the comparison must say)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import inductor_units  # noqa: E402  (benchmarks/inductor_units.py)


def test_smoke_times_both_and_finds_aot_eager_bitwise_equal():
    text = inductor_units.main(["--smoke"])
    rows = [line for line in text.splitlines() if line.startswith("| eager") or line.startswith("| torch.compile")]
    assert len(rows) == 2 and "aot_eager" in rows[1]
    assert "bitwise equal to eager; largest difference 0.0e+00" in text


def test_the_comparison_tells_a_one_ulp_difference():
    import torch
    a = [torch.ones(4), torch.full((3,), 2.0)]
    b = [torch.ones(4), torch.full((3,), 2.0).nextafter(torch.tensor(3.0))]
    assert inductor_units.compare(a, a) == (True, 0.0)
    bitwise, worst = inductor_units.compare(b, a)
    assert not bitwise and 0 < worst < 1e-6
