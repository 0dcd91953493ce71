"""Redis bookkeeping of the weight sync, shared by sender and receivers: key names, the
live-worker registry, the newest checkpoint for late joiners, and who holds which version.
The protocol itself is described in ``dapo.weights``.

What a worker reads here tells it where to connect and what to load, so whoever can write
Redis could steer it; ``check_sync_address`` and ``check_checkpoint_dir`` hold those reads
to what the worker was configured to accept."""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from dapo.weights.buckets import is_loopback
from proto.keys import check_run_id, run_key

KEY_TTL_S = 600


class WeightSyncError(RuntimeError):
    """A generation was abandoned (a member died, hung or could not connect)."""


class LayoutMismatchError(ValueError):
    """The learner's and the worker's bucket layouts differ."""


class AddressRefused(ValueError):
    """A weight-sync address or checkpoint directory read from Redis lies outside what this
    worker accepts: it is not used, and the message says which setting would allow it."""


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


def latest_checkpoint(
    redis_client, run_id: str, root: str | os.PathLike | None = None
) -> CheckpointRef | None:
    """The newest checkpoint the learner announced; with ``root``, its directory must lie
    inside it (``check_checkpoint_dir``) or ``AddressRefused`` is raised."""
    raw = redis_client.hgetall(WeightKeys(run_id).latest)
    if not raw:
        return None
    fields = {_text(k): _text(v) for k, v in raw.items()}
    ref = CheckpointRef(int(fields["version"]), fields["checkpoint_dir"])
    if root is not None:
        check_checkpoint_dir(ref.checkpoint_dir, root)
    return ref


def needs_checkpoint(
    redis_client, run_id: str, current_version: int, root: str | os.PathLike | None = None
) -> CheckpointRef | None:
    """The checkpoint to load first if it is newer than `current_version` (-1 = no weights)."""
    ref = latest_checkpoint(redis_client, run_id, root)
    return ref if ref is not None and ref.version > current_version else None


def check_checkpoint_dir(checkpoint_dir: str, root: str | os.PathLike) -> Path:
    """``checkpoint_dir`` resolved, if it lies strictly inside ``root`` (the run's
    ``<runs_dir>/<run_id>/checkpoints``) after following symlinks; a ``..`` is refused
    outright. Otherwise a Redis writer could make workers load any directory they can read."""
    given = Path(checkpoint_dir)
    if ".." in given.parts:
        raise AddressRefused(f"checkpoint dir {checkpoint_dir!r} read from Redis contains '..'")
    inside, real = Path(root).resolve(), given.resolve()
    if real == inside or not real.is_relative_to(inside):
        raise AddressRefused(
            f"checkpoint dir {checkpoint_dir!r} read from Redis resolves to {str(real)!r}, "
            f"outside the run's checkpoints {str(inside)!r}"
        )
    return real


def check_sync_address(host: str, port: object, allowed: Sequence[str] = ()) -> tuple[str, int]:
    """The weight-sync store address read from Redis as ``(host, port)``, if ``host`` is one
    of ``allowed``: an exact host or address, or a DNS suffix written with a leading dot
    (``.learner-headless.rl.svc.cluster.local``). Nothing allowed = loopback only, where the
    local stack's learner listens. Else ``AddressRefused``: a worker must not hand its
    weights' source (and its collective's connections) to whoever wrote Redis."""
    try:
        number = int(str(port))
    except ValueError:
        number = -1
    if not 0 < number < 65536:
        raise AddressRefused(f"weight-sync port {port!r} read from Redis is not a TCP port")
    name = str(host).strip().rstrip(".").lower()
    if allowed:
        accepted = bool(name) and any(_host_matches(name, entry) for entry in allowed)
    else:
        accepted = is_loopback(name)
    if not accepted:
        raise AddressRefused(
            f"weight-sync host {host!r} read from Redis is not allowed "
            f"(DAPO_SYNC_ALLOWED_HOSTS: {', '.join(allowed) or 'empty = loopback only'})"
        )
    return name, number


def _host_matches(name: str, entry: str) -> bool:
    entry = entry.strip().rstrip(".").lower()
    if entry.startswith("."):
        return name.endswith(entry) and len(name) > len(entry)
    try:
        return ipaddress.ip_address(name) == ipaddress.ip_address(entry)
    except ValueError:
        return name == entry


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
