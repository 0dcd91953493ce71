"""Redis key names, namespaced per run.

Every key of a run is ``dapo:{<run_id>}:<name>``. The braces are kept
literally: they are a Redis Cluster hash tag, so all keys of one run live in
one slot and the bus's multi-key scripts (publish + dedupe + ack) stay valid
on a cluster. Two runs never share a key, and nothing here ever deletes
another run's keys.
"""

from __future__ import annotations

import re

_RUN_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


def check_run_id(run_id: str) -> str:
    if not _RUN_ID.match(run_id):
        raise ValueError(
            f"run_id {run_id!r} must be 1-128 characters of letters, digits, '_', '.', ':' or '-'"
        )
    return run_id


def run_key(run_id: str, *parts: str) -> str:
    """``run_key("r1", "prompts")`` -> ``dapo:{r1}:prompts``."""
    return ":".join([f"dapo:{{{run_id}}}", *parts])


RUNS_INDEX = "dapo:runs"
"""Sorted set of all run ids (score = creation time), for listing."""
