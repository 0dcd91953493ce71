"""Every Redis key of a run, named in one place.

Every key of a run is ``dapo:{<run_id>}:<name>``. The braces are kept
literally: they are a Redis Cluster hash tag, so all keys of one run live in
one slot and the bus's multi-key transactions (publish + dedupe + ack) stay
valid on a cluster. Two runs never share a key, and nothing here ever deletes
another run's keys.
"""

from __future__ import annotations

import re

from proto.vocab import RUN_ID_PATTERN

_RUN_ID = re.compile(RUN_ID_PATTERN)

RUNS_INDEX = "dapo:runs"
"""Sorted set of all run ids (score = creation time), for listing."""
ACTIVE_RUNS = "dapo:runs:active"
"""Set of the run ids not yet in a final state, kept with each state change."""
SERVICES_PREFIX = "dapo:services:"
"""Heartbeats of live service processes: ``dapo:services:<kind>:<worker_id>``."""


def check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise ValueError(
            f"run_id {run_id!r} must be 1-128 characters of letters, digits, '_', '.', ':' or '-', "
            "starting with a letter, digit or '_'"
        )
    return run_id


def run_key(run_id: str, *parts: str) -> str:
    """``run_key("r1", "prompts")`` -> ``dapo:{r1}:prompts``."""
    return ":".join([f"dapo:{{{run_id}}}", *parts])


class RunKeys:
    """The keys of one run that live outside the streams (the bus names the streams)."""

    def __init__(self, run_id: str) -> None:
        self.run_id = check_run_id(run_id)
        self.spec = run_key(run_id, "spec")
        """The run spec (JSON)."""
        self.state = run_key(run_id, "state")
        """The lifecycle record (``proto.state.RunState`` JSON)."""
        self.report = run_key(run_id, "report")
        """The learner's latest ``StepReport`` (JSON)."""
        self.account = run_key(run_id, "account")
        """The sampler's account (hash of ``proto.state.ACCOUNT_FIELDS``)."""
        self.stats = run_key(run_id, "stats")
        """Bus counters (hash): dead letters per stream."""
