"""Ratel's IR: the typed records passes attach to an fx graph, and the Plan they produce.

Every record is a frozen dataclass stored under exactly one documented ``node.meta`` key (``META_KEYS``
lists who writes and who reads each key). Analyses return frozen dataclasses and never change the graph;
transforms consume them. Cross-pass invariants are written down in ``ratel/passes/README.md``.

The timeline of a training step is a sequence of ``Step``s: the forward of every unit in order, then the
backward of every unit in reverse. A tensor's lifetime and every transfer are expressed in step indices.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch
from torch import nn

# ---------------------------------------------------------------------------------------------------------
# node.meta keys. One key per record type; nothing else under the "ratel." prefix.
# ---------------------------------------------------------------------------------------------------------
META_UNIT = "ratel.unit"
META_TENSOR = "ratel.tensor"
META_COST = "ratel.cost"
META_ACTIVATION = "ratel.activation"
META_TRANSFER = "ratel.transfer"
META_PROVENANCE = "ratel.provenance"
META_UNIT_CALL = "ratel.unit_call"

META_KEYS: dict[str, tuple[str, str, str]] = {
    # key: (record type, written by, read by) -- tests/test_layers.py checks them against the code
    META_UNIT: ("str: name of the unit the node belongs to",
                "trace.discover_units (and chunk_head_loss for the nodes it creates)", "outline_units, printer"),
    META_TENSOR: ("TensorMeta", "annotate_shapes (and outline_units for the nodes it creates)",
                  "estimate_costs, time_units, outline_units, build_lifetimes, plan_activations, simulate, printer"),
    META_COST: ("NodeCost", "estimate_costs", "printer"),
    META_ACTIVATION: ("ActivationPlacement, on unit-output getitem nodes of the outlined graph",
                      "plan_placement", "printer"),
    META_TRANSFER: ("Transfer, on nodes inserted by insert_transfers / insert_releases",
                    "insert_transfers, insert_releases", "runtime.engine (graph-bound transfers), printer"),
    META_PROVENANCE: ("Provenance: which pass created the node and why",
                      "chunk_head_loss, outline_units, insert_transfers, insert_releases", "printer"),
    META_UNIT_CALL: ("UnitCall, on the run_unit nodes of the outlined graph", "outline_units",
                     "estimate_costs, build_lifetimes, runtime.engine, runtime.eager, printer"),
}


class Tier(str, enum.Enum):
    GPU = "gpu"
    HOST = "host"
    SSD = "ssd"

    def __str__(self) -> str:  # dumps print "host", not "Tier.HOST"
        return self.value


class Phase(str, enum.Enum):
    FWD = "fwd"
    BWD = "bwd"

    def __str__(self) -> str:
        return self.value


_DTYPE_ABBR = {
    torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
    torch.bool: "b8",
}


def dtype_abbr(dtype: torch.dtype) -> str:
    return _DTYPE_ABBR.get(dtype, str(dtype).replace("torch.", ""))


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------------------
# Per-node records
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorMeta:
    """Shape and storage of one tensor value. Views alias their base: ``nbytes`` counts own storage only."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int          # bytes this node allocates (0 for a view of another node's storage)
    base: str            # node whose storage holds the value (the node itself unless it is a view)
    numel: int

    @property
    def is_view(self) -> bool:
        return self.nbytes == 0 and self.numel > 0

    @property
    def value_bytes(self) -> int:
        return self.numel * (torch.finfo(self.dtype).bits // 8 if self.dtype.is_floating_point
                             else torch.iinfo(self.dtype).bits // 8 if self.dtype != torch.bool else 1)

    def short(self) -> str:
        return f"{dtype_abbr(self.dtype)}[{', '.join(str(s) for s in self.shape)}]"


@dataclass(frozen=True)
class NodeCost:
    """FLOPs of one node (forward, and the backward it induces). Counting rules: ratel/passes/estimate_costs.py."""

    fwd_flops: int
    bwd_flops: int


@dataclass(frozen=True)
class ActivationPlacement:
    """Where a unit-boundary activation waits between its forward production and its backward use."""

    value: str                    # name of the value in the outlined graph
    producer: int                 # unit index (-1: a graph input)
    consumers: tuple[int, ...]    # unit indices that read it
    nbytes: int
    tier: Tier                    # GPU: kept resident; HOST: copied out in forward, back in backward
    reason: str


class Stage(enum.IntEnum):
    """When, within its step, a transfer is issued: before the step's compute, during it (by autograd's
    pack hooks, as values are saved), or after it."""

    BEFORE = 0
    DURING = 1
    AFTER = 2


@dataclass(frozen=True)
class KindSpec:
    """What a transfer kind is: the lane it occupies (None: a release, no lane), where it moves bytes from
    and to, what its subject names, when in its step it is issued, and — for a kind whose moment the
    runtime decides — who decides (empty: the schedule executor issues it at its step, in plan order)."""

    lane: str | None          # "h2d" | "d2h" | "ssd" | "optimizer" | "compute" | None
    src: Tier | None
    dst: Tier | None
    subject: str              # "unit" | "group" | "value" (a unit-boundary activation) | "saved" (unit/key)
    stage: Stage
    dynamic: str = ""


class TransferKind(str, enum.Enum):
    """Every movement or release the plan schedules. Its properties come from ``KIND_SPECS``."""

    FETCH_PARAMS = "fetch_params"
    RELEASE_PARAMS = "release_params"
    SSD_READ_PARAMS = "ssd_read_params"
    SSD_WRITE_PARAMS = "ssd_write_params"
    OFFLOAD_ACTIVATION = "offload_activation"
    FETCH_ACTIVATION = "fetch_activation"
    RELEASE_ACTIVATION = "release_activation"
    OFFLOAD_SAVED = "offload_saved"
    SSD_WRITE_SAVED = "ssd_write_saved"
    SSD_READ_SAVED = "ssd_read_saved"
    FETCH_SAVED = "fetch_saved"
    FLUSH_GRADS = "flush_grads"
    OPTIMIZER_STEP = "optimizer_step"
    SSD_READ_STATES = "ssd_read_states"
    SSD_WRITE_STATES = "ssd_write_states"
    GPU_STEP = "gpu_step"
    WRITE_BACK_PARAMS = "write_back_params"

    def __str__(self) -> str:  # dumps print "fetch_params", not "TransferKind.FETCH_PARAMS"
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def spec(self) -> KindSpec:
        return KIND_SPECS[self]

    @property
    def lane(self) -> str | None:
        return KIND_SPECS[self].lane

    @property
    def stage(self) -> Stage:
        return KIND_SPECS[self].stage

    @property
    def dynamic(self) -> bool:
        return bool(KIND_SPECS[self].dynamic)


K = TransferKind
KIND_SPECS: dict[TransferKind, KindSpec] = {
    K.FETCH_PARAMS: KindSpec("h2d", Tier.HOST, Tier.GPU, "unit", Stage.BEFORE),
    K.RELEASE_PARAMS: KindSpec(None, Tier.GPU, None, "unit", Stage.AFTER),
    K.SSD_READ_PARAMS: KindSpec("ssd", Tier.SSD, Tier.HOST, "unit", Stage.BEFORE),
    K.SSD_WRITE_PARAMS: KindSpec("ssd", Tier.HOST, Tier.SSD, "group", Stage.AFTER,
                                 dynamic="the CPU optimizer, once the group's update is written"),
    K.OFFLOAD_ACTIVATION: KindSpec("d2h", Tier.GPU, Tier.HOST, "value", Stage.AFTER),
    K.FETCH_ACTIVATION: KindSpec("h2d", Tier.HOST, Tier.GPU, "value", Stage.BEFORE),
    K.RELEASE_ACTIVATION: KindSpec(None, Tier.GPU, None, "value", Stage.AFTER),
    K.OFFLOAD_SAVED: KindSpec("d2h", Tier.GPU, Tier.HOST, "saved", Stage.DURING,
                              dynamic="autograd's pack hook, when the unit's forward saves the value"),
    K.SSD_WRITE_SAVED: KindSpec("ssd", Tier.HOST, Tier.SSD, "saved", Stage.DURING,
                                dynamic="the SSD lane, once the unit's copies out to host are done"),
    K.SSD_READ_SAVED: KindSpec("ssd", Tier.SSD, Tier.HOST, "saved", Stage.BEFORE),
    K.FETCH_SAVED: KindSpec("h2d", Tier.HOST, Tier.GPU, "saved", Stage.BEFORE),
    K.FLUSH_GRADS: KindSpec("d2h", Tier.GPU, Tier.HOST, "unit", Stage.AFTER),
    K.OPTIMIZER_STEP: KindSpec("optimizer", Tier.HOST, Tier.HOST, "group", Stage.AFTER),
    K.SSD_READ_STATES: KindSpec("ssd", Tier.SSD, Tier.HOST, "group", Stage.BEFORE,
                                dynamic="the SSD states ring, when a staging slot frees, in plan order"),
    K.SSD_WRITE_STATES: KindSpec("ssd", Tier.HOST, Tier.SSD, "group", Stage.AFTER,
                                 dynamic="the CPU optimizer, once the group's update is done"),
    # A group resident on the GPU (plan_resident_groups): AdamW there, and its new weights copied to the host
    # copy the model object's parameters alias.
    K.GPU_STEP: KindSpec("compute", Tier.GPU, Tier.GPU, "group", Stage.AFTER),
    K.WRITE_BACK_PARAMS: KindSpec("d2h", Tier.GPU, Tier.HOST, "group", Stage.AFTER,
                                  dynamic="the optimizer, once the group's update on the GPU is issued"),
}
del K


@dataclass(frozen=True)
class Transfer:
    """One planned movement or release. ``step`` is when it is issued, ``needed_by`` when it must be done.

    The subject is typed: ``unit`` and ``group`` are indices, ``value`` a value name or a saved value's key;
    ``subject`` is the printable name (a unit, group or value name; "unit/key" for a saved value).
    ``elements`` is the optimizer work of an ``optimizer_step`` (parameters updated)."""

    kind: TransferKind
    subject: str
    nbytes: int
    src: Tier | None
    dst: Tier | None
    step: int
    needed_by: int
    slot: int | None = None
    unit: int | None = None
    group: int | None = None
    value: str | None = None
    elements: int = 0

    def __post_init__(self):
        kind = TransferKind(self.kind)
        object.__setattr__(self, "kind", kind)
        spec = kind.spec
        if (self.src, self.dst) != (spec.src, spec.dst):
            raise ValueError(f"{kind} moves {spec.src} -> {spec.dst}, not {self.src} -> {self.dst}")

    @property
    def lane(self) -> str | None:
        return self.kind.lane


def schedule_order(transfers) -> tuple["Transfer", ...]:
    """The order the runtime issues transfers in: by step, then stage within the step; ties keep the order
    the planner emitted them in."""
    return tuple(sorted(transfers, key=lambda t: (t.step, t.kind.stage)))


def step_index(steps) -> tuple[dict[int, int], dict[int, int]]:
    """(unit -> its forward step, unit -> its backward step) of a timeline."""
    fwd = {s.unit: s.index for s in steps if s.phase == Phase.FWD}
    bwd = {s.unit: s.index for s in steps if s.phase == Phase.BWD}
    return fwd, bwd


@dataclass(frozen=True)
class Provenance:
    pass_name: str
    action: str
    reason: str = ""


@dataclass(frozen=True)
class HeadLoss:
    """What chunk_head_loss did: the loss nodes it computes over chunks of ``chunk_rows`` rows, and the graph
    outputs (indices in the flat output) whose logits it no longer computes (none when ``kept_logits``)."""

    losses: tuple[str, ...]
    dropped_outputs: tuple[int, ...]
    chunk_rows: int
    kept_logits: bool


# ---------------------------------------------------------------------------------------------------------
# Model structure
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Unit:
    """The offload granularity: one repeated block, or the graph before the first / after the last block."""

    index: int
    name: str                      # "embed", "model.layers.3", "head"
    kind: str                      # "pre" | "block" | "post"
    params: tuple[str, ...]        # canonical parameter names the unit reads, in first-use order
    buffers: tuple[str, ...]       # buffers and constants the unit reads
    has_random_ops: bool = False   # dropout & co.: the recompute must replay the RNG


def canonical_parameter_names(model: nn.Module) -> dict[str, str]:
    """Every parameter name (tied aliases included) -> the first name under which it appears."""
    first_name: dict[int, str] = {}
    canonical: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        canonical[name] = first_name.setdefault(id(param), name)
    return canonical


@dataclass(frozen=True)
class ParamGroup:
    """Parameters stored in one flat buffer: those of one dtype read by exactly the same set of units.

    The fp32 master, the Adam states and the host gradient share the element layout ``offsets``; the
    compute copy (the one sent to the GPU) is the same layout in ``dtype``, ``nbytes`` long.
    """

    index: int
    name: str
    params: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]       # element offset of each parameter in the flat buffers
    numel: int
    dtype: torch.dtype             # compute dtype of every parameter in the group
    users: tuple[int, ...]         # unit indices that read the group, ascending
    trainable: bool

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each parameter of the group as a view of ``flat`` (any buffer with the group's element layout)."""
        return [flat[offset:offset + math.prod(shape)].view(shape) for shape, offset in zip(self.shapes, self.offsets)]

    @property
    def update_unit(self) -> int:
        """Backward runs units in reverse, so the group's gradient is complete after its lowest user."""
        return self.users[0]


@dataclass(frozen=True)
class Step:
    index: int
    phase: Phase
    unit: int

    def label(self, units: tuple[Unit, ...]) -> str:
        return f"{self.phase} {units[self.unit].name}"


def timeline(num_units: int) -> tuple[Step, ...]:
    fwd = [Step(i, Phase.FWD, i) for i in range(num_units)]
    bwd = [Step(num_units + k, Phase.BWD, num_units - 1 - k) for k in range(num_units)]
    return tuple(fwd + bwd)


@dataclass(frozen=True)
class UnitCall:
    """How the outlined graph calls one unit: which values go in and come out, which parameters it reads."""

    unit: int
    name: str
    module: str                    # attribute of the top-level GraphModule holding the unit's graph
    inputs: tuple[str, ...]        # activation values, in the unit graph's placeholder order
    params: tuple[str, ...]        # canonical parameter name of each parameter placeholder, in order
    buffers: tuple[str, ...]       # buffer / constant name of each buffer placeholder, in order
    outputs: tuple[str, ...]       # values the unit returns (read by later units or by the user)


@dataclass(frozen=True)
class SavedValue:
    """A storage autograd keeps from a unit's forward for its backward (views of it share the record)."""

    key: str                       # the producing node's name, or "internal:<n>" for an op's hidden output
    node: str | None               # producing node (None: saved by an op but not a graph value, e.g. an lse)
    nbytes: int
    recompute_flops: int           # FLOPs of re-running the producing node (0 for element-wise ops)
    recompute_bytes: int           # bytes the producing node reads and writes (element-wise cost)
    recomputable: bool             # a graph value of a non-random op (internal values never are)
    shape: tuple[int, ...] = ()    # geometry of the producing node's output within the storage
    stride: tuple[int, ...] = ()
    offset: int = 0


@dataclass(frozen=True)
class PackRef:
    """One tensor autograd saves, in the order it saves them: what it is a view of, and the view."""

    index: int
    source: str                    # "param" | "input" | "buffer" | "value"
    name: str                      # canonical parameter / input value / buffer name / SavedValue key
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int                    # storage offset in elements
    dtype: torch.dtype


@dataclass(frozen=True)
class UnitCost:
    """What one unit costs: FLOPs, the GPU bytes its compute needs beyond parameters and boundaries, and
    what autograd saves when its forward runs with autograd on."""

    unit: int
    fwd_flops: int
    bwd_flops: int
    param_bytes: int               # compute-dtype bytes of every parameter the unit reads
    fwd_workspace: int             # peak transient bytes of a no-grad forward (excluding inputs)
    saved_bytes: int               # bytes autograd keeps between the recomputed forward and its backward
    bwd_workspace: int             # peak transient bytes of recompute + backward (excluding inputs, params)
    output_bytes: int
    grad_fwd_workspace: int = 0    # peak transient bytes of a forward with autograd, saved values included
    bwd_only_workspace: int = 0    # peak bytes of the backward alone, given every saved value
    saved: tuple[SavedValue, ...] = ()
    packs: tuple[PackRef, ...] = ()
    # Seconds measured on the target device (passes/time_units.py); None: not measured, the simulator prices
    # the unit from its FLOPs. A no-grad forward, a forward with autograd, the backward alone.
    fwd_seconds: float | None = None
    grad_fwd_seconds: float | None = None
    bwd_seconds: float | None = None

    @property
    def measured(self) -> bool:
        return self.fwd_seconds is not None


@dataclass(frozen=True)
class SavedDecision:
    """Where one saved value of a unit waits between its forward and its backward."""

    key: str
    nbytes: int
    tier: Tier | None              # GPU: kept; HOST / SSD: swapped out and fetched back; None: recomputed
    recompute_seconds: float       # predicted cost of recomputing it (what storing it saves)


@dataclass(frozen=True)
class UnitActivations:
    """A unit's activation strategy. "recompute": only the unit's inputs are checkpointed and the whole unit
    runs again in backward. "saved": the forward runs with autograd and every saved value has a decision."""

    unit: int
    mode: str
    decisions: tuple[SavedDecision, ...] = ()

    def bytes_on(self, tier: Tier | None) -> int:
        return sum(d.nbytes for d in self.decisions if d.tier == tier)

    def decision(self, key: str) -> SavedDecision:
        for d in self.decisions:
            if d.key == key:
                return d
        raise KeyError(key)


@dataclass(frozen=True)
class ActivationPlan:
    """plan_activations' decisions for every unit, and how it chose (predicted step time per candidate)."""

    policy: str                    # "auto" | "recompute" | "keep" | "host" | "ssd"
    units: tuple[UnitActivations, ...]
    search: tuple[tuple[int, float, int], ...] = ()   # (values stored, predicted seconds, GPU peak) per candidate

    def of(self, unit: int) -> UnitActivations:
        return self.units[unit]


@dataclass(frozen=True)
class CostModel:
    units: tuple[UnitCost, ...]
    total_fwd_flops: int
    total_bwd_flops: int


# ---------------------------------------------------------------------------------------------------------
# Analyses
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Lifetime:
    """A tensor of the training step and the span of steps over which it must exist on ``tier``."""

    tensor: str
    kind: str          # "param" | "grad" | "optimizer_state" | "activation" | "workspace"
    nbytes: int
    first: int
    last: int
    tier: Tier
    makes: tuple[int, ...] = ()    # steps that produce it
    reads: tuple[int, ...] = ()    # steps that read it


@dataclass(frozen=True)
class Lifetimes:
    """The timeline, the parameter groups, and when every tensor of the step is made and read."""

    steps: tuple[Step, ...]
    groups: tuple[ParamGroup, ...]
    records: tuple[Lifetime, ...]

    def of_kind(self, kind: str) -> tuple[Lifetime, ...]:
        return tuple(r for r in self.records if r.kind == kind)

    def get(self, tensor: str) -> Lifetime:
        for record in self.records:
            if record.tensor == tensor:
                return record
        raise KeyError(tensor)


@dataclass(frozen=True)
class ParamFetch:
    """Parameters of one unit resident in one ring slot over the steps ``first``..``last``."""

    unit: int
    slot: int
    issue: int         # step at whose start the copy is issued (one step ahead of ``first``)
    first: int
    last: int


@dataclass(frozen=True)
class SlotLayout:
    """Where each parameter group of a unit sits inside a GPU ring slot (byte offsets)."""

    unit: int
    groups: tuple[int, ...]
    byte_offsets: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class PlacementPlan:
    """The decisions of plan_placement: a tier for every tensor class and the parameter ring schedule."""

    # group name -> home tier of its compute copy; GPU: the group is resident there for the whole run (its
    # master and moments too, updated by AdamW on the GPU), and its host copy is only what the model aliases
    param_tier: tuple[tuple[str, Tier], ...]
    optimizer_tier: tuple[tuple[str, Tier], ...]      # group name -> tier of master, exp_avg, exp_avg_sq
    activations: tuple[ActivationPlacement, ...]
    fetches: tuple[ParamFetch, ...]
    layouts: tuple[SlotLayout, ...]                   # one per unit
    depth: int                                        # ring slots on the GPU
    slot_bytes: int

    def optimizer_tier_of(self, group: str) -> Tier:
        return dict(self.optimizer_tier)[group]

    def param_tier_of(self, group: str) -> Tier:
        return dict(self.param_tier)[group]

    def on_gpu(self, group: str) -> bool:
        """Whether the group lives on the GPU for the whole run (weights, master, moments; updated there)."""
        return self.param_tier_of(group) == Tier.GPU

    @property
    def gpu_groups(self) -> tuple[str, ...]:
        """The names of the groups that live on the GPU (``on_gpu``), in group order."""
        return tuple(name for name, tier in self.param_tier if tier == Tier.GPU)

    def fetch_at(self, step: int) -> ParamFetch:
        for fetch in self.fetches:
            if fetch.first <= step <= fetch.last:
                return fetch
        raise KeyError(step)


@dataclass(frozen=True)
class Schedule:
    """Every transfer and release of one step, forward ones also materialised as graph nodes."""

    transfers: tuple[Transfer, ...]


@dataclass(frozen=True)
class StepMemory:
    step: int
    gpu: int
    breakdown: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class MemoryProfile:
    steps: tuple[StepMemory, ...]
    gpu_peak: int
    gpu_peak_step: int
    host_bytes: tuple[tuple[str, int], ...]
    host_total: int
    ssd_total: int


@dataclass(frozen=True)
class StepTime:
    step: int
    compute: float      # seconds of GPU compute
    h2d: float          # seconds of host-to-GPU copies issued for this step
    d2h: float
    optimizer: float    # seconds of CPU optimizer work that becomes ready in this step
    ssd: float = 0.0    # seconds of SSD reads and writes issued in this step
    comm: float = 0.0   # seconds of the data-parallel ranks' exchange before the updates of this step


@dataclass(frozen=True)
class TimeProfile:
    """Predicted seconds per step from the hardware profile; transfers overlap compute on their own lanes."""

    steps: tuple[StepTime, ...]
    total: float        # predicted step time: the GPU lanes and the optimizer queue simulated to the end
    spans: tuple = ()   # the simulated schedule: a Span per piece of work, as a measured step records them

    @property
    def compute(self) -> float:
        return sum(s.compute for s in self.steps)


@dataclass(frozen=True)
class Plan:
    """Everything Ratel decided for one traced graph: the contract the runtime executes."""

    units: tuple[Unit, ...]
    groups: tuple[ParamGroup, ...]
    steps: tuple[Step, ...]
    placement: PlacementPlan
    transfers: tuple[Transfer, ...]
    costs: CostModel
    memory: MemoryProfile
    times: "TimeProfile"
    activations: "ActivationPlan"
    budget_gpu: int
    budget_host: int
    compute_dtype: torch.dtype
    device: str
    ranks: int = 1      # data-parallel ranks the plan is made for (each runs it on its share of the batch)

    def transfers_at(self, step: int) -> tuple[Transfer, ...]:
        return tuple(t for t in self.transfers if t.step == step)

    def ssd_state_order(self) -> tuple[int, ...]:
        """Group indices in the order the plan reads their SSD-resident optimizer states."""
        return tuple(t.group for t in self.transfers if t.kind == TransferKind.SSD_READ_STATES)


# ---------------------------------------------------------------------------------------------------------
# What a real step measured (engine.profile = True), to set beside the plan's predictions
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Span:
    """One interval of work on one lane of a real step."""

    lane: str          # "compute" | "h2d" | "d2h" | "ssd_read" | "ssd_write" | "optimizer"
    label: str         # e.g. "fwd model.layers.3", "params model.layers.4", "adamw model.layers.3"
    start: float       # seconds since the step's forward began
    end: float
    step: int          # timeline step index it belongs to (-1: none)
    nbytes: int = 0


@dataclass(frozen=True)
class StepRecord:
    """A measured training step: what ran when on which lane, and the GPU memory peak of each timeline step."""

    spans: tuple[Span, ...]
    gpu_peak_by_step: tuple[int, ...]   # bytes; torch.cuda.max_memory_allocated within each timeline step
    gpu_peak: int
    wall: float                         # seconds from the forward's start to the end of engine.step()
