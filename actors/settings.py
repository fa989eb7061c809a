"""The run configuration as actor processes receive it: a light copy.

Every hospital trainer and the coordinator get the run's settings as a
constructor argument, which Ray pickles into the actor's process. Unpickling
a ``cluster.config.RunConfig`` imports ``cluster.config``, which imports the
privacy module (Opacus, SciPy) for its ``DPConfig`` field type: about 120 MB
of resident memory and 2-5 s of CPU in every actor process, even in a run
without differential privacy. ``for_actors`` copies the configuration into
``ActorSettings`` namespaces defined here, so an actor imports only what the
run uses (``DPConfig`` travels as itself when DP is on, where the actor needs
the privacy module anyway).

The copy has the same attribute names as ``RunConfig`` (nested sections
become nested ``ActorSettings``) and the two methods the coordinator uses,
``sampled_per_round`` and ``quorum_count``, with ``RunConfig``'s arithmetic.
It is a snapshot: changing it does not change the ``RunConfig`` it came from.
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Any

# Modules whose dataclasses are copied into namespaces rather than sent as
# themselves: the configuration's own sections.
_FLATTENED_MODULES = ("cluster.config",)


class ActorSettings(types.SimpleNamespace):
    """A run configuration (or one of its sections) as plain attributes."""

    def sampled_per_round(self) -> int:
        """Hospitals asked to train each round: ``fraction`` of them, at least one."""
        return max(1, round(self.fraction * self.data.hospitals))

    def quorum_count(self, sampled: int) -> int:
        """Accepted updates a round with ``sampled`` hospitals needs."""
        if self.quorum >= 1:
            return int(self.quorum)
        return max(1, math.ceil(self.quorum * sampled))


def for_actors(config: Any) -> Any:
    """Returns ``config`` as ``ActorSettings`` for actor constructors.

    config: a ``cluster.config.RunConfig`` (or any dataclass of
        ``cluster.config``); an ``ActorSettings`` is returned unchanged.
    Fields holding dataclasses of other modules (``clinical.DataSpec``,
    ``federation.privacy.DPConfig``) and plain values are kept as they are;
    dicts and lists are copied one level deep.
    """
    if isinstance(config, ActorSettings):
        return config
    if not (dataclasses.is_dataclass(config) and not isinstance(config, type)):
        raise TypeError(
            f"for_actors needs a RunConfig (a dataclass instance), got "
            f"{type(config).__name__}"
        )
    values = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if (dataclasses.is_dataclass(value) and not isinstance(value, type)
                and type(value).__module__ in _FLATTENED_MODULES):
            value = for_actors(value)
        elif isinstance(value, dict):
            value = dict(value)
        elif isinstance(value, list):
            value = list(value)
        values[f.name] = value
    return ActorSettings(**values)
