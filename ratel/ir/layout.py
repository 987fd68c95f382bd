"""Byte layout: every rule that says how many bytes a buffer takes and where it sits, in one place.

The planner prices host memory with these rules and the runtime allocates with the same ones, so the
memory a plan predicts is the memory the runtime takes (``engine.host_bytes_allocated()``).

  PAGE          host buffers start on a page: what O_DIRECT needs for the SSD tier, and what pinned copies like
  SLOT_ALIGN    parameter groups inside a GPU ring slot start on 256 bytes (CUDA's allocation granularity)
  staging rings how many buffers each SSD tier stages through (states, parameters, saved activations)
  state pieces  a group's optimizer states on SSD move in pieces of at most SSD_PIECE_NUMEL elements, so
                the host stages a few pieces, not a few groups (a GPT-3-sized block's states are 21 GiB)
"""
from __future__ import annotations

import torch

from ratel.ir import ActivationPlacement, ActivationPlan, ParamGroup, Tier

PAGE = 4096
SLOT_ALIGN = 256
SSD_STAGING_BUFFERS = 3   # optimizer states: one being read, one being updated, one being written back
SSD_PARAM_BUFFERS = 4     # parameter groups on SSD: two read ahead, one copying to the GPU, one written back
SAVED_SSD_REGIONS = 3     # saved activations on SSD: one filling, one writing behind, one read back
GRAD_RING_SLOTS = 4       # gradients on their way to the CPU optimizer: landing, waiting, being updated
SSD_PIECE_NUMEL = 1 << 25  # 384 MiB of master + moments: large requests keep the disk at its rate


def ceil_div(n: int, d: int) -> int:
    return -(-n // d)


def round_up(n: int, alignment: int) -> int:
    return ceil_div(n, alignment) * alignment


def span_elems(t: torch.Tensor) -> int:
    """Elements of ``t``'s storage from the first to the last one the view touches (strides kept as they are)."""
    if t.numel() == 0:
        return 0
    return 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))


def span_bytes(t: torch.Tensor) -> int:
    return span_elems(t) * t.element_size()


def page(n: int) -> int:
    return round_up(n, PAGE)


def pool_bytes(sizes, slack: int = PAGE) -> int:
    """Bytes of a PinnedPool handing out buffers of ``sizes``: each starts on a page; ``slack`` per buffer
    leaves room for views taken at unaligned sizes."""
    return sum(page(n) + slack for n in sizes)


def ssd_state_pieces(group: ParamGroup) -> tuple[tuple[int, int, int], ...]:
    """The pieces a group's optimizer states on SSD move in: (first element, end element, file offset). A
    piece holds [master | exp_avg | exp_avg_sq] of its elements (no master when the group computes in fp32:
    the master is its compute copy and stays in host memory) and starts on a page of the file."""
    pieces, offset = [], 0
    for start in range(0, max(group.numel, 1), SSD_PIECE_NUMEL):   # an empty group: one empty piece
        end = min(start + SSD_PIECE_NUMEL, group.numel)
        pieces.append((start, end, offset))
        offset += page(ssd_piece_bytes(group, end - start))
    return tuple(pieces)


def ssd_piece_bytes(group: ParamGroup, numel: int) -> int:
    """Bytes of ``numel`` elements' optimizer states on SSD (see ``ssd_state_pieces``)."""
    return numel * 4 * (2 if group.dtype == torch.float32 else 3)


def ssd_staging_bytes(group: ParamGroup) -> int:
    """The largest piece of a group's states: what one staging buffer must hold."""
    return ssd_piece_bytes(group, min(group.numel, SSD_PIECE_NUMEL))


def ssd_staging_slots(groups) -> int:
    """Staging buffers the SSD states of ``groups`` pass through: a ring of SSD_STAGING_BUFFERS pieces, fewer
    when there are fewer pieces."""
    return min(SSD_STAGING_BUFFERS, sum(len(ssd_state_pieces(g)) for g in groups))


def ssd_state_bytes(group: ParamGroup) -> int:
    """Bytes of a group's optimizer state on SSD, its pieces each starting on a page."""
    start, end, offset = ssd_state_pieces(group)[-1]
    return offset + ssd_piece_bytes(group, end - start)


def exchange_bytes(group: ParamGroup, ranks: int) -> int:
    """Bytes one of ``ranks`` data-parallel ranks sends through host memory for a group's update
    (ratel.runtime.ranks): its slice of the new compute copy to every other rank. (The gradient was
    reduce-scattered on the GPUs: ``scatter_bytes``.)"""
    if ranks <= 1 or not group.trainable:
        return 0
    return group.nbytes * (ranks - 1) // ranks


def scatter_bytes(group: ParamGroup, ranks: int) -> int:
    """Bytes one of ``ranks`` ranks sends to reduce-scatter a streamed group's gradient among the GPUs, as the
    backward that completes it ends: (N-1)/N of it, in the compute dtype, each micro-batch."""
    if ranks <= 1 or not group.trainable:
        return 0
    return landing_numel(group, ranks) * group.dtype.itemsize * (ranks - 1)


def landing_numel(group: ParamGroup, ranks: int = 1) -> int:
    """Elements of a group's gradient that land in host memory: all of them, or with ``ranks`` this rank's
    slice (``ratel.runtime.ranks.Ranks.shard``: ceil(numel / N), the last rank's possibly fewer)."""
    return ceil_div(group.numel, ranks)


def device_state_bytes(group: ParamGroup, accumulate: int = 1) -> int:
    """GPU bytes a group resident on the GPU holds for the whole run (plan_resident_groups): its compute copy
    and, when it trains, its fp32 master (unless the compute copy is one), Adam moments, and with
    accumulation the fp32 sum of the micro-batches' gradients."""
    total = round_up(group.nbytes, SLOT_ALIGN)
    if group.trainable:
        states = 2 if group.dtype == torch.float32 else 3
        states += 1 if accumulate > 1 else 0
        total += states * round_up(group.numel * 4, SLOT_ALIGN)
    return total


def device_update_scratch_bytes(group: ParamGroup) -> int:
    """GPU bytes an update on the GPU takes while it runs: torch's fused AdamW reads an fp32 gradient."""
    return group.numel * 4 if group.trainable else 0


def host_updated(groups, param_tier: dict | None) -> list[ParamGroup]:
    """The groups whose gradients leave the GPU for the CPU optimizer: all but those resident on the GPU."""
    param_tier = param_tier or {}
    return [g for g in groups if param_tier.get(g.name) != Tier.GPU]


def device_exchange_bytes(group: ParamGroup, accumulate: int, ranks: int) -> int:
    """Bytes one of ``ranks`` ranks sends to average the gradient of a group resident on the GPU (a ring
    all-reduce among the GPUs; every rank then applies the whole update, so no weights follow)."""
    if ranks <= 1 or not group.trainable:
        return 0
    grad = group.numel * 4 if accumulate > 1 else group.nbytes
    return 2 * grad * (ranks - 1) // ranks


def grad_ring_slots(groups, accumulate: int = 1, clip: bool = False, ranks: int = 1) -> int | None:
    """Slots of the ring gradients stream through from the GPU to the CPU optimizer, or None when every group
    needs a buffer of its own: clipping without accumulation updates only after the whole backward, from the
    gradients as they landed; and when the slots would take more than a buffer per group (a small model).
    Enough slots for the groups one unit's backward completes, and one more."""
    trainable = [g for g in groups if g.trainable]
    if not trainable or (clip and accumulate == 1):
        return None
    per_unit: dict[int, int] = {}
    for g in trainable:
        per_unit[g.update_unit] = per_unit.get(g.update_unit, 0) + 1
    slots = max(GRAD_RING_SLOTS, max(per_unit.values()) + 1)
    sizes = [landing_bytes(g, ranks) for g in trainable]
    if slots * page(max(sizes)) >= sum(page(n) for n in sizes):
        return None
    return slots


def landing_bytes(group: ParamGroup, ranks: int = 1) -> int:
    """Bytes of a group's gradient landing in host memory (``landing_numel``, in the compute dtype)."""
    return landing_numel(group, ranks) * group.dtype.itemsize


def grad_staging_sizes(groups, accumulate: int = 1, clip: bool = False, ranks: int = 1) -> list[int]:
    """Bytes of each pinned gradient staging buffer: ring slots of the largest group, or one per group (with
    ranks, of this rank's slice)."""
    slots = grad_ring_slots(groups, accumulate, clip, ranks)
    trainable = [g for g in groups if g.trainable]
    if slots is None:
        return [landing_bytes(g, ranks) for g in trainable]
    return [max(landing_bytes(g, ranks) for g in trainable)] * slots


def compute_copy_bytes(groups: tuple[ParamGroup, ...], params_on_ssd: set[str] = frozenset()) -> int:
    """Pinned bytes of the compute copies held in host memory (fp32 masters double as them)."""
    return pool_bytes([g.nbytes for g in groups if g.name not in params_on_ssd], slack=0)


def store_pool_bytes(groups: tuple[ParamGroup, ...], params_on_ssd: set[str] = frozenset(), accumulate: int = 1,
                     clip: bool = False, shared_copies: bool = False, on_gpu: set[str] = frozenset(),
                     ranks: int = 1) -> int:
    """Pinned bytes the parameter store takes: compute copies (fp32 masters double as them; not with
    ``shared_copies``, where the ranks of a host map one copy), gradient staging (none for the groups
    ``on_gpu``, updated there), and the staging ring of parameter groups whose compute copies live on SSD."""
    sizes = [] if shared_copies else [g.nbytes for g in groups if g.name not in params_on_ssd]
    sizes += grad_staging_sizes([g for g in groups if g.name not in on_gpu], accumulate, clip, ranks)
    total = pool_bytes(sizes, slack=0)
    ssd = [g for g in groups if g.name in params_on_ssd]
    if ssd:
        total += pool_bytes([max(g.nbytes for g in ssd)] * SSD_PARAM_BUFFERS)
    return total


def activation_pool_bytes(activations: tuple[ActivationPlacement, ...]) -> int:
    """Pinned bytes of the unit-boundary activations checkpointed to host."""
    return pool_bytes(a.nbytes for a in activations if a.tier == Tier.HOST)


def saved_ssd_offsets(acts: ActivationPlan) -> dict[int, dict[str, int]]:
    """Offset of every SSD-resident saved value in its unit's swap file (page aligned for O_DIRECT)."""
    layout: dict[int, dict[str, int]] = {}
    for unit in acts.units:
        offset = 0
        for d in unit.decisions:
            if d.tier == Tier.SSD:
                layout.setdefault(unit.unit, {})[d.key] = offset
                offset += page(d.nbytes)
    return layout


def saved_unit_bytes(acts: ActivationPlan) -> dict[int, int]:
    """Bytes of each unit's SSD-resident saved values in its swap file (and in a staging region)."""
    return {u.unit: sum(page(d.nbytes) for d in u.decisions if d.tier == Tier.SSD) for u in acts.units}


def saved_region_bytes(acts: ActivationPlan) -> int:
    """Bytes of one SSD staging region for saved values: the largest unit's SSD-resident values."""
    return max(saved_unit_bytes(acts).values(), default=0)


def saved_staging_bytes(region: int) -> int:
    """Pinned bytes of the SSD staging regions for saved values, given the largest unit's SSD bytes."""
    return SAVED_SSD_REGIONS * (region + PAGE) if region else 0


def saved_host_bytes(acts: ActivationPlan | None) -> tuple[int, int]:
    """(pinned bytes of host-resident saved values, pinned bytes of the SSD staging regions)."""
    if acts is None:
        return 0, 0
    host = pool_bytes(d.nbytes for u in acts.units for d in u.decisions if d.tier == Tier.HOST)
    return host, saved_staging_bytes(saved_region_bytes(acts))


def program_pool_bytes(activations: tuple[ActivationPlacement, ...], acts: ActivationPlan | None) -> int:
    """The pinned pool of one program (one input shape): boundary activations and saved values."""
    return activation_pool_bytes(activations) + sum(saved_host_bytes(acts))


def host_usage(groups, optimizer_tier: dict[str, Tier], activations, torch_adam: bool,
               param_tier: dict[str, Tier] | None = None, accumulate: int = 1,
               clip: bool = False, ranks: int = 1) -> tuple[tuple[str, int], ...]:
    """Every host buffer the runtime allocates for this placement, by name (pinned and pageable). With several
    data-parallel ranks (one host's) each keeps host-resident masters and Adam moments only for its slice of a
    group, receives only that slice of each gradient (reduce-scattered on the GPUs) and sums only it, and the
    compute copies are one shared copy: a rank's share is 1/N of them."""
    param_tier = param_tier or {}
    streamed = host_updated(groups, param_tier)    # a group resident on the GPU keeps only the model's copy here

    def share(numel: int) -> int:
        return ceil_div(numel, ranks)

    if accumulate > 1:   # fp32 sums of the micro-batches' gradients, as p.grad accumulates them
        usage = [(f"gradient accumulation (fp32):{g.name}", share(g.numel) * 4) for g in streamed if g.trainable]
    else:
        usage = []
    for g in groups:
        params_on_ssd = param_tier.get(g.name) == Tier.SSD
        if not g.trainable:
            if not params_on_ssd:
                usage.append((f"frozen parameters:{g.name}", page(share(g.nbytes))))
            continue
        on_host = optimizer_tier[g.name] == Tier.HOST
        if g.dtype == torch.float32:
            usage.append((f"fp32 master (compute copy):{g.name}", page(share(g.nbytes))))
            if on_host:
                usage.append((f"adam states:{g.name}", share(g.numel) * 8))
        else:
            if not params_on_ssd:
                usage.append((f"compute copy:{g.name}", page(share(g.nbytes))))
            if on_host:
                usage.append((f"fp32 master + adam states:{g.name}", share(g.numel) * 12))
    if grad_ring_slots(streamed, accumulate, clip, ranks) is None:
        usage += [(f"gradient staging:{g.name}", page(landing_bytes(g, ranks))) for g in streamed if g.trainable]
    else:
        usage.append(("gradient staging ring",
                      sum(page(n) for n in grad_staging_sizes(streamed, accumulate, clip, ranks))))
    ssd_params = [g for g in groups if param_tier.get(g.name) == Tier.SSD]
    if ssd_params:
        usage.append(("parameter SSD staging", SSD_PARAM_BUFFERS * (page(max(g.nbytes for g in ssd_params)) + PAGE)))
    if torch_adam:   # torch's fused AdamW needs the gradient in fp32; the native kernel reads it as it is
        scratch = max((share(g.numel) * 4 for g in streamed if g.trainable and g.dtype != torch.float32), default=0)
        if scratch:
            usage.append(("fp32 gradient scratch", scratch))
    ssd = [g for g in groups if g.trainable and optimizer_tier[g.name] == Tier.SSD]
    if ssd:
        biggest = max(page(ssd_staging_bytes(g)) + PAGE for g in ssd)
        usage.append(("SSD staging buffers", ssd_staging_slots(ssd) * biggest))
    pool = sum(page(a.nbytes) + PAGE for a in activations if a.tier == Tier.HOST)
    if pool:
        usage.append(("activation pool", pool + PAGE))
    usage.append(("pinned pool alignment", PAGE))
    return tuple(usage)
