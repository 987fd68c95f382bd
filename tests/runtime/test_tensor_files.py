"""Tensor files: the O_DIRECT stream writes exactly the bytes given, whatever their sizes; files read back by
the safetensors library; a changed byte is named."""
from __future__ import annotations

import stat

import pytest
import torch

from ratel.runtime.tensor_files import (CheckpointError, DirectStream, ShardedWriter, TensorReader, TensorWriter,
                                        hash_pool)


def test_the_direct_stream_writes_exactly_its_input_across_blocks_and_a_partial_last_page(tmp_path):
    g = torch.Generator().manual_seed(0)
    pieces = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g) for n in (1, 4095, 8192, 13, 20000, 7)]
    stream = DirectStream(tmp_path / "f.bin", block=8192)
    for piece in pieces:
        stream.write(piece)
    stream.close()
    assert (tmp_path / "f.bin").read_bytes() == torch.cat(pieces).numpy().tobytes()
    assert stat.S_IMODE((tmp_path / "f.bin").stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        DirectStream(tmp_path / "f.bin")


def test_written_files_read_back_with_safetensors_and_verified(tmp_path):
    from safetensors import safe_open
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(1000).to(torch.bfloat16), "c": torch.arange(7)}
    pool = hash_pool()
    writer = ShardedWriter(tmp_path, "model", [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], pool,
                           max_shard_bytes=1 << 30)
    for name, t in tensors.items():
        writer.put(name, t)
    files = writer.finish()
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        for name, t in tensors.items():
            assert torch.equal(f.get_tensor(name), t)
    reader = TensorReader(tmp_path / "model.safetensors", pool, files["model.safetensors"])
    assert torch.equal(reader.read("b"), tensors["b"])
    reader.close()
    with open(tmp_path / "model.safetensors", "r+b") as f:      # one byte of "c" (the last tensor) changed
        f.seek(-3, 2)
        f.write(b"\x7f")
    reader = TensorReader(tmp_path / "model.safetensors", pool, files["model.safetensors"])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: the bytes of c do not match"):
        reader.read("c")
    pool.shutdown()


def test_a_writer_refuses_tensors_out_of_order(tmp_path):
    writer = TensorWriter(tmp_path / "x.safetensors", [("a", torch.float32, (2,)), ("b", torch.float32, (2,))],
                          hash_pool())
    with pytest.raises(RuntimeError, match="got b"):
        writer.put("b", torch.zeros(2))
    writer.abort()


def test_the_read_ahead_skips_weights_whose_master_the_load_reads_instead(tmp_path):
    from ratel.runtime.tensor_files import TensorSet
    pool = hash_pool()
    weights = {"w": torch.ones(4, dtype=torch.bfloat16), "frozen": torch.zeros(8, dtype=torch.bfloat16)}
    states = {"master/w": torch.ones(4), "exp_avg/w": torch.zeros(4), "exp_avg_sq/w": torch.zeros(4)}
    files = {}
    for stem, tensors in (("model", weights), ("optimizer", states)):
        writer = ShardedWriter(tmp_path, stem, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], pool,
                               max_shard_bytes=1 << 30)
        for name, t in tensors.items():
            writer.put(name, t)
        files.update(writer.finish())
    found = TensorSet(tmp_path, files, pool)
    ranges = found.read_ahead_ranges()
    found.close()
    pool.shutdown()
    model, optimizer = tmp_path / "model.safetensors", tmp_path / "optimizer.safetensors"
    # "frozen" alone from the weights (after w's 8 bytes), and the three states as one merged range
    assert [(p.name, end - begin) for p, begin, end in ranges] == [(model.name, 16), (optimizer.name, 48)]
