"""Data parallel over ``torch.distributed``: the ranks of one training job and what they exchange.

Each rank runs its own engine on its share of the global batch (as with DistributedDataParallel, the user
gives each rank its rows). As the backward that completes a group's gradient ends, the gradient is
reduce-scattered among the GPUs (averaged, each rank receiving its slice, ``shard``: 1/N of the elements), and
only that slice is copied to host memory; every rank's CPU AdamW updates only its own slice of the group
(summed over the micro-batches when accumulating) and keeps the master and Adam moments of that slice only, and
writes the slice's new weights into the one copy of the compute weights the ranks of the host share
(``ratel.runtime.memory.SharedPool``; compute copies on SSD are private, their slices are sent with
``gather_``), so every rank reads the same weights in the next forward. A checkpoint or ``state_dict()``
gathers the slices of masters and moments, which is why those are collectives (every rank calls them). Only
the ranks of one host are supported.

Collectives run on a gloo group of their own, created when the engine is compiled: the host tensors they
move are the CPU optimizer's, it issues them from its worker thread, and a group of its own keeps them from
interleaving with any collective the user's code runs on the default group. Groups resident on the GPU
(plan_resident_groups) are whole on every rank, as with DistributedDataParallel: their gradients are averaged
on the GPUs, over an NCCL group of Ratel's own, and every rank applies the same update.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ratel.errors import RatelError


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    local_world: int                 # ranks on this host: they share its host memory and SSDs
    group: object = None             # the gloo process group of Ratel's host collectives
    # a group of Ratel's own for gradients on the GPU (NCCL; on CPU ranks another gloo group): the training
    # thread reduce-scatters them while the optimizer's worker may be exchanging on ``group``
    device_group: object = None

    @classmethod
    def of_environment(cls) -> "Ranks | None":
        """The job this process is a rank of (``torchrun`` sets WORLD_SIZE), or None for one process. The
        default process group is initialised here when the caller has not (NCCL with GPUs, else gloo)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if not dist.is_available() or (world <= 1 and not dist.is_initialized()):
            return None
        if not dist.is_initialized():
            if "MASTER_ADDR" not in os.environ:
                raise RatelError(f"WORLD_SIZE={world} but no MASTER_ADDR: start the job with torchrun "
                                 "(torchrun --nproc-per-node N train.py), or call "
                                 "torch.distributed.init_process_group() before ratel.compile")
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        world = dist.get_world_size()
        if world == 1:
            return None
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if local != world:
            raise RatelError(f"{world} ranks over {world // max(local, 1)} hosts: Ratel's data parallel runs the ranks "
                             "of one host (they share its memory and SSDs); start one host's GPUs with torchrun "
                             "--nproc-per-node N")
        device = dist.new_group(backend="nccl" if dist.get_backend() == "nccl" else "gloo")
        return cls(dist.get_rank(), world, local, dist.new_group(backend="gloo"), device)

    # ------------------------------------------------------------------ slices of a flat group
    def shard(self, numel: int, rank: int | None = None) -> tuple[int, int]:
        """The elements ``[start, end)`` of a flat group of ``numel`` that ``rank`` (default: this one) updates."""
        rank = self.rank if rank is None else rank
        chunk = -(-numel // self.world)
        return min(numel, rank * chunk), min(numel, (rank + 1) * chunk)

    # ------------------------------------------------------------------ collectives (every rank, same order)
    def average_(self, tensor: torch.Tensor, device: bool = False) -> torch.Tensor:
        """``tensor`` (a host gradient, or with ``device`` one of a group resident on the GPU) becomes its mean
        over the ranks, as DistributedDataParallel averages."""
        dist.all_reduce(tensor, group=self.device_group if device else self.group)
        return tensor.div_(self.world)

    def reduce_scatter_(self, out: torch.Tensor, tensor: torch.Tensor, stream=None) -> torch.Tensor:
        """``out`` (``tensor.numel() / N`` elements) becomes this rank's slice of the mean of ``tensor`` (a
        gradient on the GPU, padded to N slices) over the ranks: the slice ``shard`` gives, padding included.

        With a CUDA ``stream`` (the D2H lane) only that stream waits for the collective, and the mean is taken
        there: the caller's stream goes on with the next unit's backward meanwhile. Without one (CPU ranks) it
        is done when this returns."""
        work = dist.reduce_scatter_tensor(out, tensor, group=self.device_group, async_op=True)
        if stream is None:
            work.wait()
            return out.div_(self.world)
        with torch.cuda.stream(stream):
            work.wait()                      # the stream waits, not this thread
            for t in (tensor, out):          # neither is reused before the stream is past the collective
                t.record_stream(stream)
            out.div_(self.world)
        return out

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (a few host numbers, e.g. squares of gradient slices) becomes its sum over the ranks."""
        dist.all_reduce(tensor, group=self.group)
        return tensor

    def gather_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's slice of the flat ``tensor`` goes to all ranks: afterwards each holds all of it."""
        for rank in range(self.world):
            start, end = self.shard(tensor.numel(), rank)
            if start < end:
                dist.broadcast(tensor[start:end], src=rank, group=self.group)
        return tensor

    def from_rank0_(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` takes rank 0's values on every rank."""
        dist.broadcast(tensor, src=0, group=self.group)
        return tensor

    def all_agree(self, ok: bool) -> bool:
        """Whether every rank says ``ok`` (one failing rank fails them all, instead of leaving them waiting)."""
        flag = torch.tensor([0 if ok else 1], dtype=torch.int32)
        dist.all_reduce(flag, group=self.group)
        return int(flag) == 0

    def same_everywhere(self, value: int, what: str, hint: str) -> None:
        """Raise, on every rank, unless every rank passes the same ``value`` (e.g. a count of micro-batches)."""
        values = torch.tensor([value, -value], dtype=torch.int64)
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.group)
        if int(values[0]) != value or -int(values[1]) != value:
            raise RatelError(f"rank {self.rank}: {what} differs between ranks (here {value}; from "
                             f"{-int(values[1])} to {int(values[0])} across them): {hint}")

    def measure_gbps(self, nbytes: int = 16 << 20, repeats: int = 3) -> float:
        """GB/s each rank sends in an all-reduce of ``nbytes`` of host memory (the fastest of ``repeats``), as
        the exchange before each update moves them."""
        tensor = torch.ones(nbytes // 4, dtype=torch.float32)
        best = float("inf")
        for _ in range(repeats):
            self.barrier()
            start = time.perf_counter()
            dist.all_reduce(tensor, group=self.group)
            best = min(best, time.perf_counter() - start)
        return 2 * nbytes * (self.world - 1) / self.world / best / 1e9

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def from_rank0(self, value):
        """Rank 0's ``value`` on every rank (what all must decide alike, e.g. the measured hardware)."""
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]
