"""The runtime operations that appear in Ratel's rewritten graph.

Each takes the runtime as its first argument, so the same graph runs under the real ``Runtime`` (streams,
pinned pools, the CPU optimizer) or under ``EagerRuntime`` (plain tensors, used to check every pass
numerically against the eager model). They print in dumps as ``ratel.<name>(runtime, ...)``.
"""
from __future__ import annotations


def run_unit(runtime, unit: str, *inputs):
    """Run one unit's forward; its backward recomputes it (checkpointed at the unit boundary)."""
    return runtime.run_unit(unit, inputs)


def prefetch_params(runtime, unit: str, slot: int) -> None:
    """Issue the host-to-GPU copy of a unit's parameters into a ring slot (asynchronous)."""
    runtime.prefetch_params(unit, slot)


def wait_params(runtime, unit: str) -> None:
    """Make compute wait until the unit's parameters are in their slot."""
    runtime.wait_params(unit)


def release_params(runtime, unit: str) -> None:
    """The unit's slot may be overwritten once the compute issued so far is done."""
    runtime.release_params(unit)


def offload_activation(runtime, name: str, value) -> None:
    """Copy a unit-boundary activation to host memory; the backward fetches it back."""
    runtime.offload_activation(name, value)


def keep_activation(runtime, name: str, value) -> None:
    """Keep a unit-boundary activation resident on the GPU until its last backward use."""
    runtime.keep_activation(name, value)
