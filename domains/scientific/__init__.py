"""The scientific domain: staged simulations on a research cluster.

A research group runs simulations of days to months on hundreds of nodes: each a workflow of
stages (one engine job, its tasks the stages), grouped in scenarios such as parameter sweeps.
This package is the :class:`SciencePolicy` (``taskfarm serve --policy science --policy-config
cluster.toml``) with its configuration and journaled events, the Python API to build
simulations, and the forecasting of resource use; ``taskfarm science ...`` is its CLI.
"""

from ._config import (
    ClusterConfig,
    MaintenanceWindow,
    Reservation,
    load_cluster_config,
    parse_cluster_config,
)
from ._events import (
    SCIENCE_CODEC,
    MaintenanceCancelled,
    MaintenanceScheduled,
    MemberPinned,
    ReservationCancelled,
    ReservationMade,
)
from ._model import (
    Scenario,
    Simulation,
    SimulationMetadata,
    SimulationStage,
    conditional_branch,
    extension,
    fan_out_fan_in,
    linear_chain,
    parameter_sweep,
)
from ._policy import SciencePolicy, science_policy

__all__ = [
    "SCIENCE_CODEC",
    "ClusterConfig",
    "MaintenanceCancelled",
    "MaintenanceScheduled",
    "MaintenanceWindow",
    "MemberPinned",
    "Reservation",
    "ReservationCancelled",
    "ReservationMade",
    "Scenario",
    "SciencePolicy",
    "Simulation",
    "SimulationMetadata",
    "SimulationStage",
    "conditional_branch",
    "extension",
    "fan_out_fan_in",
    "linear_chain",
    "load_cluster_config",
    "parameter_sweep",
    "parse_cluster_config",
    "science_policy",
]
