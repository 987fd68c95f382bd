"""EagerRuntime: runs a rewritten program with plain tensors and no transfers.

The reference each pass is checked against: whatever a pass inserted, the program must compute what the
eager model computes. Parameters and buffers come from a dict; the transfer operations do nothing.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ratel.ir import META_UNIT_CALL


class EagerRuntime:
    def __init__(self, gm: fx.GraphModule, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]):
        self.gm = gm
        self.params = params
        self.buffers = buffers
        self.calls = {n.meta[META_UNIT_CALL].name: n.meta[META_UNIT_CALL]
                      for n in gm.graph.nodes if META_UNIT_CALL in n.meta}

    def run_unit(self, unit: str, inputs: tuple):
        call = self.calls[unit]
        module = getattr(self.gm, call.module)
        return tuple(module(*inputs, *[self.params[p] for p in call.params],
                            *[self.buffers[b] for b in call.buffers]))

    def prefetch_params(self, unit, slot) -> None:
        pass

    def wait_params(self, unit) -> None:
        pass

    def release_params(self, unit) -> None:
        pass

    def offload_activation(self, name, value) -> None:
        pass

    def keep_activation(self, name, value) -> None:
        pass
