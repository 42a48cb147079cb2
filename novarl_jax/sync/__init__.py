"""Weight synchronisation between the trainer and asynchronous rollout workers.

:class:`ParamStore` holds the published :class:`VersionedParams`;
:class:`WeightSyncController` decides when to publish (its pure core is
:mod:`novarl_jax.sync.controller`: ``init``, ``should_broadcast``, ``record_broadcast``,
``request_broadcast``, ``admissible``).
"""

from novarl_jax.sync.controller import (
    FORCED_REASONS,
    REASONS,
    SyncState,
    WeightSyncController,
    admissible,
    staleness,
)
from novarl_jax.sync.versioned import ParamStore, VersionedParams

__all__ = [
    "FORCED_REASONS",
    "REASONS",
    "ParamStore",
    "SyncState",
    "VersionedParams",
    "WeightSyncController",
    "admissible",
    "staleness",
]
