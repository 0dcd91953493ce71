"""Redis bookkeeping of the weight sync, shared by sender and receivers: key names, the
live-worker registry, the newest checkpoint for late joiners, and who holds which version.
The protocol itself is described in ``dapo.weights``."""

from __future__ import annotations

import json
from typing import NamedTuple

from proto.keys import check_run_id, run_key

KEY_TTL_S = 600


class WeightSyncError(RuntimeError):
    """A generation was abandoned (a member died, hung or could not connect)."""


class LayoutMismatchError(ValueError):
    """The learner's and the worker's bucket layouts differ."""


class CheckpointRef(NamedTuple):
    """The newest checkpoint the learner wrote: `(version, checkpoint_dir)`."""

    version: int
    checkpoint_dir: str


class WeightKeys:
    """Redis key names of one run's weight sync."""

    def __init__(self, run_id: str) -> None:
        base = run_key(check_run_id(run_id), "weights")
        self.rendezvous = f"{base}:rendezvous"
        self.workers = f"{base}:workers"
        self.expected = f"{base}:expected"
        self.reports = f"{base}:reports"
        self.latest = f"{base}:latest"
        self._base = base

    def alive(self, worker_id: str) -> str:
        return f"{self._base}:alive:{worker_id}"

    def inbox(self, worker_id: str) -> str:
        return f"{self._base}:inbox:{worker_id}"

    def acks(self, incarnation: str, update: int) -> str:
        return f"{self._base}:acks:{incarnation}:{update}"


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def live_workers(redis_client, run_id: str) -> set[str]:
    """Registered workers whose heartbeat key has not expired; drops the expired ones."""
    keys = WeightKeys(run_id)
    registered = [_text(w) for w in redis_client.hkeys(keys.workers)]
    pipe = redis_client.pipeline()
    for worker in registered:
        pipe.exists(keys.alive(worker))
    flags = pipe.execute()
    dead = [w for w, ok in zip(registered, flags, strict=True) if not ok]
    if dead:
        redis_client.hdel(keys.workers, *dead)
    return {w for w, ok in zip(registered, flags, strict=True) if ok}


def publish_checkpoint(redis_client, run_id: str, version: int, checkpoint_dir: str) -> None:
    """Learner side: records the newest checkpoint, for workers that missed updates."""
    redis_client.hset(
        WeightKeys(run_id).latest, mapping={"version": version, "checkpoint_dir": checkpoint_dir}
    )


def latest_checkpoint(redis_client, run_id: str) -> CheckpointRef | None:
    raw = redis_client.hgetall(WeightKeys(run_id).latest)
    if not raw:
        return None
    fields = {_text(k): _text(v) for k, v in raw.items()}
    return CheckpointRef(int(fields["version"]), fields["checkpoint_dir"])


def needs_checkpoint(redis_client, run_id: str, current_version: int) -> CheckpointRef | None:
    """The checkpoint to load first if it is newer than `current_version` (-1 = no weights)."""
    ref = latest_checkpoint(redis_client, run_id)
    return ref if ref is not None and ref.version > current_version else None


def stale_or_mismatched_workers(
    redis_client, run_id: str, version: int | None = None
) -> dict[str, str]:
    """Live workers that do not hold `version` (default: newest broadcast) bit for bit.

    Returns worker_id -> reason ("no report", "stale: ...", "checksum mismatch
    ...", "unverified ..."); an empty dict means every live worker agrees.
    """
    keys = WeightKeys(run_id)
    expected = {int(_text(k)): _text(v) for k, v in redis_client.hgetall(keys.expected).items()}
    if version is None:
        if not expected:
            return {}
        version = max(expected)
    reports = {_text(k): json.loads(v) for k, v in redis_client.hgetall(keys.reports).items()}
    verdicts: dict[str, str] = {}
    for worker in sorted(live_workers(redis_client, run_id)):
        report = reports.get(worker)
        if report is None:
            verdicts[worker] = "no report"
            continue
        held, checksum = int(report["version"]), report.get("checksum")
        if held < version:
            verdicts[worker] = f"stale: holds version {held}, expected {version}"
        elif checksum is None:
            verdicts[worker] = f"unverified: version {held} reported without checksum"
        elif held not in expected:
            verdicts[worker] = f"unknown version {held}: no expected checksum"
        elif checksum != expected[held]:
            verdicts[worker] = f"checksum mismatch at version {held}"
    return verdicts
