"""Node specialization: where a task runs best -- a pure score over one fitting node.

score = job-type match x hardware class x fit x over-provisioning x learned speed x energy

- **job-type match**: 1.0 when the node's class is built for the job type (``job_types`` in
  ``farm.toml``, or a bare node label naming the type), else 0.7.  A prior: once the class has
  measured frames of the type, the measured class factor replaces it and the class's
  configured ``performance``.
- **hardware class**: the class's ``performance`` (a prior), or its measured speed for the type
  relative to the farm.
- **fit**: best fit, ``1 - w x (share of the node left free after placing)``, with ``w`` set
  by the energy mode: packing work lets whole nodes sleep.
- **over-provisioning**: a task without GPUs on a GPU node x0.8; a task asking less than half of
  a scarce class's cores x0.7 -- a small job should not take a scarce big node.
- **learned speed**: how much faster the node is than its class for this job type (1.0 unknown).
- **energy**: in the efficiency and night-savings modes, nodes that do more per watt score a
  little higher.

A retry avoids the node it just failed on (x0.3).  Every factor is positive, so no fitting node
is ever forbidden: specialization only chooses among nodes that are free now.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from actors import Resources

from ._config import EnergyMode, NodeClass

__all__ = ["PACKING", "NodeProfile", "base_factor", "fit_factor", "specialization_score"]

PACKING: Final[Mapping[EnergyMode, float]] = {
    "performance": 0.05,
    "balanced": 0.2,
    "efficiency": 0.5,
    "night-savings": 0.5,
}
MISMATCH: Final = 0.7
# A task without GPUs on a GPU node: the GPUs idle, but such nodes are often the fastest, so
# a mild penalty (0.5 made vfx shun the fastest class and miss deadlines in the bench).
GPU_WASTE: Final = 0.8
SCARCE_WASTE: Final = 0.7
RETRY_HERE: Final = 0.3


@dataclass(frozen=True, slots=True)
class NodeProfile:
    """What scoring needs of a node: its class, its type labels, its power draw."""

    name: str
    node_class: NodeClass
    type_labels: frozenset[str]
    idle_watts: float
    busy_watts: float
    sleep_watts: float

    def built_for(self, job_type: str) -> bool:
        """Return whether the node's class (or its own labels) name the job type."""
        return job_type in self.node_class.job_types or job_type in self.type_labels

    @property
    def watts_per_performance(self) -> float:
        """Return busy watts per unit of configured performance."""
        return self.busy_watts / self.node_class.performance


def base_factor(
    *,
    job_type: str,
    node: NodeProfile,
    class_factor: float | None,
    node_factor: float | None,
    mode: EnergyMode,
    reference_watts: float | None = None,
) -> float:
    """Return the factors that depend on the node and the job type, not on the request:
    job-type match x hardware class x learned speed x energy."""
    if class_factor is None:
        hardware = node.node_class.performance * (1.0 if node.built_for(job_type) else MISMATCH)
    else:
        hardware = class_factor
    energy = 1.0
    if reference_watts and mode in ("efficiency", "night-savings"):
        energy = min(1.3, max(0.7, (reference_watts / node.watts_per_performance) ** 0.5))
    return hardware * (node_factor or 1.0) * energy


def fit_factor(
    *, request: Resources, free: Resources, capacity: Resources, node: NodeProfile, mode: EnergyMode
) -> float:
    """Return fit x over-provisioning for placing ``request`` where ``free`` is left."""
    left = 0.0
    if capacity.millicores:
        left += (free.millicores - request.millicores) / capacity.millicores
    if capacity.memory:
        left += (free.memory - request.memory) / capacity.memory
    fit = 1.0 - PACKING[mode] * max(0.0, min(1.0, left / 2))
    if capacity.gpus and not request.gpus:
        fit *= GPU_WASTE
    if node.node_class.scarce and request.millicores * 2 < capacity.millicores:
        fit *= SCARCE_WASTE
    return fit


def specialization_score(
    *,
    request: Resources,
    job_type: str,
    node: NodeProfile,
    free: Resources,
    capacity: Resources,
    class_factor: float | None,
    node_factor: float | None,
    mode: EnergyMode,
    reference_watts: float | None = None,
    retry_here: bool = False,
) -> float:
    """Return the node's score for the task (higher is better; always positive)."""
    score = base_factor(
        job_type=job_type,
        node=node,
        class_factor=class_factor,
        node_factor=node_factor,
        mode=mode,
        reference_watts=reference_watts,
    ) * fit_factor(request=request, free=free, capacity=capacity, node=node, mode=mode)
    return score * RETRY_HERE if retry_here else score
