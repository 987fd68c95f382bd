"""annotate_shapes: record shape, dtype and storage of every tensor value (``node.meta["ratel.tensor"]``).

Stages:
  1. Read the FakeTensor export left in ``node.meta["val"]`` (export already ran the graph under a
     FakeTensorMode, so no tensor is allocated here, and a 175B model costs nothing).
  2. Resolve aliasing: a value whose storage is one seen before is a view of that value's base
     (``nbytes=0, base=<base node>``); lifetimes and memory simulation then see views as their base.

Before / after::

    transpose = aten.transpose.int(view, 1, 2)
  ->
    transpose: "f32[2, 2, 8, 16]" = aten.transpose.int(view, 1, 2)   # TensorMeta(nbytes=0, base="linear")
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.multiprocessing.reductions import StorageWeakRef

from ratel.ir import META_TENSOR, TensorMeta
from ratel.passes.manager import PassContext, PassResult, graph_pass


def tensor_meta_of(value: torch.Tensor, name: str, base: str | None) -> TensorMeta:
    own = value.untyped_storage().nbytes() if base is None else 0
    return TensorMeta(shape=tuple(int(s) for s in value.shape), dtype=value.dtype, nbytes=int(own),
                      base=base or name, numel=int(value.numel()))


@graph_pass(requires=("graph:canonical",), ensures=("meta:ratel.tensor",))
def annotate_shapes(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    storage_owner: dict[StorageWeakRef, str] = {}
    for node in gm.graph.nodes:
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            continue
        key = StorageWeakRef(value.untyped_storage())
        owner = storage_owner.setdefault(key, node.name)
        node.meta[META_TENSOR] = tensor_meta_of(value, node.name, None if owner == node.name else owner)
    return PassResult(gm, modified=False)
