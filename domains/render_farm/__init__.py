"""The render-farm domain: deadlines that are met, client shares, specialised nodes, previews
first and energy, as a ``Policy`` over the engine's seams.

The public surface: the models (``RenderJob``, ``RenderNode``, ``RenderMetadata``), the
configuration (``FarmConfig``, ``Client``, ``load_farm_config``), the policy
(``RenderFarmPolicy``, and ``render_farm_policy`` that ``taskfarm serve --policy render-farm
--policy-config farm.toml`` calls), its journaled events (``RENDER_CODEC``) and the journal's
projections for the audit (``audit_journal``).  The rules live in pure modules tested with
tables: ``_deadline``, ``_shares``, ``_specialization``, ``_speed``, ``_preemption``,
``_previews``, ``_energy``, ``_forecast``.  ``run_render_demo`` is ``taskfarm demo``'s render
farm; ``tiny_renderer`` its ray tracer.
"""

from pathlib import Path as _Path

from ._config import (
    ENERGY_MODES,
    TIERS,
    Client,
    EnergyMode,
    EnergySettings,
    FarmConfig,
    NodeClass,
    PreviewDefaults,
    Tariff,
    Tier,
    load_farm_config,
    parse_farm_config,
)
from ._demo import RenderDemo, run_render_demo
from ._events import (
    RENDER_CODEC,
    DeadlineVerdictChanged,
    EnergyModeChanged,
    FarmConfigChanged,
    PriorityChanged,
)
from ._models import (
    PreviewPlan,
    PreviewSettings,
    RenderJob,
    RenderMetadata,
    RenderNode,
    RenderSettings,
)
from ._policy import RenderFarmPolicy

__all__ = [
    "ENERGY_MODES",
    "RENDER_CODEC",
    "TIERS",
    "Client",
    "DeadlineVerdictChanged",
    "EnergyMode",
    "EnergyModeChanged",
    "EnergySettings",
    "FarmConfig",
    "FarmConfigChanged",
    "NodeClass",
    "PreviewDefaults",
    "PreviewPlan",
    "PreviewSettings",
    "PriorityChanged",
    "RenderDemo",
    "RenderFarmPolicy",
    "RenderJob",
    "RenderMetadata",
    "RenderNode",
    "RenderSettings",
    "Tariff",
    "Tier",
    "load_farm_config",
    "parse_farm_config",
    "render_farm_policy",
    "run_render_demo",
]


def render_farm_policy(config: _Path | None) -> RenderFarmPolicy:
    """Build the policy from ``farm.toml`` (the ``taskfarm.policies`` factory).

    Raises:
        ConfigurationError: the file cannot be read or is invalid (naming the file and field),
            or no file was given (the farm's clients must be known).
    """
    from runtime import ConfigurationError

    if config is None:
        raise ConfigurationError(
            "the render-farm policy needs a farm.toml (its clients, node classes, tariffs)",
            where="--policy-config",
        )
    return RenderFarmPolicy(load_farm_config(config), config_path=_Path(config))
