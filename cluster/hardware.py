"""Accelerators as Ray sees them: detection, a TPU type table, worker placement.

One generation worker runs per accelerator host: on TPU it owns all of the
host's chips, on GPU one GPU (or ``gpus_per_worker`` of them, e.g. a whole
host), on CPU one host (for development and tests). This module turns the
cluster's node resources into the Ray options of such a worker and into how
many of them the cluster can hold. It knows nothing about models.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping, Sequence
from typing import Any

TPU_RESOURCE = "TPU"
GPU_RESOURCE = "GPU"
CPU_RESOURCE = "CPU"


class Accelerator(enum.Enum):
    """The device family a job's workers run on."""

    AUTO = "auto"
    TPU = "tpu"
    GPU = "gpu"
    CPU = "cpu"

    @classmethod
    def parse(cls, value: str | Accelerator) -> Accelerator:
        """Parses ``auto|tpu|gpu|cpu`` (case-insensitive), naming the choices on error."""
        if isinstance(value, Accelerator):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise ValueError(
                f"unknown accelerator {value!r}; expected one of {[a.value for a in cls]}"
            ) from None


@dataclasses.dataclass(frozen=True)
class TpuType:
    """One TPU slice shape.

    Attributes:
      name: Cloud TPU accelerator type, e.g. ``v4-16``.
      chips: Chips in the slice.
      hosts: VMs (Ray nodes) the slice spans.
    """

    name: str
    chips: int
    hosts: int

    @property
    def chips_per_host(self) -> int:
        return self.chips // self.hosts


def _slices(prefix: str, shapes: Sequence[tuple[int, int, int]]) -> dict[str, TpuType]:
    return {f"{prefix}-{n}": TpuType(f"{prefix}-{n}", chips, hosts) for n, chips, hosts in shapes}


# Checked-in shapes of common slices (suffix, chips, hosts). v2-v4 and v5p name
# slices by TensorCores (two per chip); v5e and v6e by chips.
TPU_TYPES: Mapping[str, TpuType] = {
    **_slices(
        "v4",
        [
            (8, 4, 1),
            (16, 8, 2),
            (32, 16, 4),
            (64, 32, 8),
            (128, 64, 16),
            (256, 128, 32),
            (512, 256, 64),
        ],
    ),
    **_slices(
        "v5p", [(8, 4, 1), (16, 8, 2), (32, 16, 4), (64, 32, 8), (128, 64, 16), (256, 128, 32)]
    ),
    **_slices(
        "v5litepod",
        [
            (1, 1, 1),
            (4, 4, 1),
            (8, 8, 1),
            (16, 16, 4),
            (32, 32, 8),
            (64, 64, 16),
            (128, 128, 32),
            (256, 256, 64),
        ],
    ),
    **_slices(
        "v6e",
        [
            (1, 1, 1),
            (4, 4, 1),
            (8, 8, 1),
            (16, 16, 4),
            (32, 32, 8),
            (64, 64, 16),
            (128, 128, 32),
            (256, 256, 64),
        ],
    ),
}


DEFAULT_TPU_CHIPS_PER_HOST = 4
"""Chips of one host of a multi-host v4, v5e, v5p or v6e slice: a TPU worker's share
when no TPU node is up yet to tell."""


def tpu_type(name: str) -> TpuType:
    """Looks up a slice shape by accelerator type (``v4-16``, ``TPU-v4-16``), naming the known ones."""
    key = name.removeprefix("TPU-").removesuffix("-head").lower()
    try:
        return TPU_TYPES[key]
    except KeyError:
        raise ValueError(f"unknown TPU type {name!r}; known: {sorted(TPU_TYPES)}") from None


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    """A multi-host slice as Ray's TPU utilities reserve it (``ray.util.tpu.SlicePlacementGroup``).

    Attributes:
      pod_type: Cloud TPU accelerator type, e.g. ``v5p-16``.
      version: Accelerator version, e.g. ``v5p``.
      topology: Chip topology Ray reserves, e.g. ``2x2x2``.
      hosts: Hosts (Ray nodes, one worker each).
      chips_per_host: Chips each host holds.
    """

    pod_type: str
    version: str
    topology: str
    hosts: int
    chips_per_host: int


def tpu_slice(pod_type: str) -> TpuSlice:
    """The slice shape of ``pod_type`` for whole-slice reservations.

    Raises:
      ValueError: Unknown or single-host type (the message names the multi-host ones).
    """
    from ray._private.accelerators import tpu as ray_tpu
    from ray.util import tpu

    shape = tpu_type(pod_type)
    multi = sorted(n for n, t in TPU_TYPES.items() if t.hosts > 1)
    if shape.hosts < 2:
        raise ValueError(f"{pod_type} is a single-host slice; --tpu-slice takes a multi-host "
                         f"one: {multi}")
    version = tpu.get_tpu_version_from_type(f"TPU-{shape.name.split('-')[0].upper()}")
    # Ray's own topologies for the type; the squarest one when several have as many chips.
    topologies = sorted(
        (t for t in ray_tpu.VALID_TPU_TOPOLOGY[version]
         if ray_tpu.infer_tpu_pod_type_from_topology(t, f"TPU-{version}") == shape.name),
        key=lambda t: (max(map(int, t.split("x"))), t))
    if not topologies:
        raise ValueError(f"Ray knows no {version} topology for {pod_type}")
    return TpuSlice(pod_type=shape.name, version=version, topology=topologies[0],
                    hosts=shape.hosts, chips_per_host=shape.chips_per_host)


def tpu_type_of_node(resources: Mapping[str, float]) -> TpuType | None:
    """The slice type a node advertises through Ray's ``TPU-<type>-head`` resource, if any."""
    for key in resources:
        if key.startswith("TPU-") and key.endswith("-head"):
            try:
                return tpu_type(key)
            except ValueError:
                return None
    return None


@dataclasses.dataclass(frozen=True)
class Node:
    """A live Ray node's identity and total resources."""

    node_id: str
    address: str
    resources: Mapping[str, float]

    def amount(self, name: str) -> float:
        return float(self.resources.get(name, 0.0))


def live_nodes(raw_nodes: Sequence[Mapping[str, Any]]) -> list[Node]:
    """Converts ``ray.nodes()`` output to ``Node`` values, dropping dead nodes."""
    return [
        Node(
            node_id=n["NodeID"],
            address=n.get("NodeManagerAddress", ""),
            resources=dict(n.get("Resources", {})),
        )
        for n in raw_nodes
        if n.get("Alive", n.get("alive", False))
    ]


def detect_accelerator(nodes: Sequence[Node]) -> Accelerator:
    """TPU if any node has TPU chips, else GPU if any has GPUs, else CPU."""
    if any(n.amount(TPU_RESOURCE) >= 1 for n in nodes):
        return Accelerator.TPU
    if any(n.amount(GPU_RESOURCE) >= 1 for n in nodes):
        return Accelerator.GPU
    return Accelerator.CPU


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """Where one worker runs and what it reserves.

    Attributes:
      accelerator: Device family (never AUTO).
      num_cpus: CPUs reserved for scheduling.
      num_gpus: GPUs reserved.
      resources: Custom resources reserved (TPU chips live here).
      capacity: How many such workers the live nodes can hold at once.
      hosts: Nodes able to hold at least one worker.
      description: Human-readable placement, e.g. ``"4 TPU chips per host"``.
    """

    accelerator: Accelerator
    num_cpus: float
    num_gpus: float
    resources: Mapping[str, float]
    capacity: int
    hosts: int
    description: str

    def ray_options(self) -> dict[str, Any]:
        """Keyword arguments for ``ActorClass.options``."""
        options: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            options["num_gpus"] = self.num_gpus
        if self.resources:
            options["resources"] = dict(self.resources)
        return options

    def default_workers(self) -> int:
        """One worker per host on CPU (JAX uses every core), else one per unit of capacity."""
        return self.hosts if self.accelerator is Accelerator.CPU else self.capacity


def _fits(node: Node, need: Mapping[str, float]) -> int:
    counts = [math.floor(node.amount(k) / v) for k, v in need.items() if v > 0]
    return min(counts) if counts else 0


def worker_spec(
    nodes: Sequence[Node],
    accelerator: Accelerator | str = Accelerator.AUTO,
    *,
    gpus_per_worker: float = 1.0,
    cpus_per_worker: float = 1.0,
    tpu_chips: int | None = None,
) -> WorkerSpec:
    """Derives the worker placement for ``accelerator`` from the live nodes.

    Args:
      nodes: Live nodes (see ``live_nodes``).
      accelerator: Requested family; AUTO picks with ``detect_accelerator``.
      gpus_per_worker: GPUs per GPU worker (1: one per GPU; the host's count:
        one per host).
      cpus_per_worker: CPUs a CPU worker reserves.
      tpu_chips: TPU chips a TPU worker reserves (one host's). None: those of
        the smallest TPU host present, else ``DEFAULT_TPU_CHIPS_PER_HOST``
        (a cluster whose TPU nodes the autoscaler has yet to create).

    Returns:
      The spec; ``capacity`` may be 0 when no node fits (callers report it).
    """
    acc = Accelerator.parse(accelerator)
    if acc is Accelerator.AUTO:
        acc = detect_accelerator(nodes)
    if acc is Accelerator.TPU:
        chip_counts = [int(n.amount(TPU_RESOURCE)) for n in nodes if n.amount(TPU_RESOURCE) >= 1]
        # A worker takes a whole host; the smallest host fixes the per-worker share.
        chips = tpu_chips or min(chip_counts, default=DEFAULT_TPU_CHIPS_PER_HOST)
        need = {TPU_RESOURCE: float(chips)}
        spec = dict(
            num_cpus=0.0,
            num_gpus=0.0,
            resources=need,
            description=f"{chips} TPU chip(s) per worker (one per host)",
        )
    elif acc is Accelerator.GPU:
        need = {GPU_RESOURCE: float(gpus_per_worker)}
        spec = dict(
            num_cpus=0.0,
            num_gpus=float(gpus_per_worker),
            resources={},
            description=f"{gpus_per_worker:g} GPU(s) per worker",
        )
    else:
        need = {CPU_RESOURCE: float(cpus_per_worker)}
        spec = dict(
            num_cpus=float(cpus_per_worker),
            num_gpus=0.0,
            resources={},
            description=f"{cpus_per_worker:g} CPU(s) per worker, one per host",
        )
    fits = [_fits(n, need) for n in nodes]
    return WorkerSpec(accelerator=acc, capacity=sum(fits), hosts=sum(f > 0 for f in fits), **spec)
