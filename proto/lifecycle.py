"""The run lifecycle: its states and the one table of moves between them.

::

    pending --start--> running <--resume/pause--> paused
       |                  |                         |
       +-------stop-------+---------stop------------+--> stopping --(learner)--> stopped
                          +--(learner: last step)--> completed
    any active state --(a service that cannot go on)--> failed

Users move a run with the actions of ``ACTIONS`` (the control API's routes);
the services move it to a final state. A final state is never left.
"""

from __future__ import annotations

from typing import Literal

RunStatus = Literal["pending", "running", "paused", "stopping", "stopped", "completed", "failed"]

ACTIVE: frozenset[str] = frozenset({"pending", "running", "paused", "stopping"})
"""A run in one of these states holds the cluster (one active run at a time by default)."""
FINAL: frozenset[str] = frozenset({"stopped", "completed", "failed"})
"""Final states: services exit, nothing moves the run again."""

Action = Literal["start", "stop", "pause", "resume"]
ACTIONS: dict[str, tuple[frozenset[str], RunStatus]] = {
    "start": (frozenset({"pending"}), "running"),
    "stop": (frozenset({"pending", "running", "paused"}), "stopping"),
    "pause": (frozenset({"pending", "running"}), "paused"),
    "resume": (frozenset({"pending", "paused"}), "running"),
}
"""action -> (states it may be taken from, state it sets)."""

ENDINGS: dict[RunStatus, frozenset[str]] = {
    "completed": frozenset({"running", "paused", "stopping"}),
    "stopped": frozenset({"stopping"}),
    "failed": ACTIVE,
}
"""final state -> states a service may end the run from."""
