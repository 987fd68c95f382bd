"""benchmarks/ssd_stream.py on the CPU: the stream runs the runtime's SSD states path (pieces through the
staging ring, the native AdamW on each), so after its steps every group's master on the SSD is what torch's
AdamW gives for the same gradients, whatever the ring and swapper configuration measured."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import ssd_stream  # noqa: E402  (benchmarks/ssd_stream.py)

from ratel.ir import layout  # noqa: E402


@pytest.mark.parametrize("slots,piece,depth", [(3, 1000, 4), (5, 700, 16)])
def test_stream_leaves_the_states_torch_adamw_gives(tmp_path, slots, piece, depth):
    groups = ssd_stream.groups_of(3 * 2500 * ssd_stream.STATE_BYTES, 2500)
    assert len(groups) == 3
    steps = 2
    with ssd_stream.staging(slots, piece):
        assert layout.ssd_staging_slots(groups) == slots
        assert len(layout.ssd_state_pieces(groups[0])) == -(-2500 // piece)
        result = ssd_stream.stream(str(tmp_path), groups, steps, 1 << 20, depth, threads=1, read_back=True)
    assert (layout.SSD_STAGING_BUFFERS, layout.SSD_PIECE_NUMEL) != (slots, piece)      # restored
    # Every step, the untimed one too, reads every group's states once.
    assert result["bytes_read"] == (steps + 1) * 3 * 2500 * ssd_stream.STATE_BYTES == (steps + 1) * result["moved"] // 2
    grad = torch.randn(2500, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).float()
    master = torch.zeros(2500, requires_grad=True)
    optimizer = torch.optim.AdamW([master], lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    for _ in range(steps + 1):      # the untimed step and the timed ones
        master.grad = grad.clone()
        optimizer.step()
    for got in result["masters"]:
        torch.testing.assert_close(got, master.detach(), rtol=1e-6, atol=1e-9)
