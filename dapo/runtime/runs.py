"""Runs in Redis: the spec, the lifecycle state, and the registry of live services."""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from dataclasses import dataclass

import redis

from proto.keys import RUNS_INDEX, check_run_id, run_key
from proto.messages import RunState, RunStatus
from proto.runspec import RunSpec

ACTIVE: frozenset[str] = frozenset({"pending", "running", "paused", "stopping"})
FINAL: frozenset[str] = frozenset({"stopped", "completed", "failed"})
SERVICES_PREFIX = "dapo:services:"


class RunNotFound(KeyError):
    pass


class InvalidTransition(ValueError):
    """A status change the run's lifecycle does not allow (e.g. resume a stopped run)."""


def new_run_id(spec: RunSpec) -> str:
    return f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


@dataclass
class RunStore:
    client: redis.Redis

    def create(self, spec: RunSpec, run_id: str | None = None) -> RunState:
        run_id = check_run_id(run_id or new_run_id(spec))
        state = RunState(run_id=run_id)
        if not self.client.set(run_key(run_id, "spec"), spec.model_dump_json(), nx=True):
            raise ValueError(f"run {run_id} already exists")
        self._write_state(state)
        self.client.zadd(RUNS_INDEX, {run_id: state.created_at})
        return state

    def _write_state(self, state: RunState) -> None:
        self.client.set(run_key(state.run_id, "state"), state.model_dump_json())

    def spec(self, run_id: str) -> RunSpec:
        raw = self.client.get(run_key(run_id, "spec"))
        if raw is None:
            raise RunNotFound(run_id)
        return RunSpec.model_validate_json(raw)

    def state(self, run_id: str) -> RunState:
        raw = self.client.get(run_key(run_id, "state"))
        if raw is None:
            raise RunNotFound(run_id)
        return RunState.model_validate_json(raw)

    def _compare_and_set(self, run_id: str, change) -> RunState:
        """Read-modify-write of the state under WATCH, so concurrent writers do not clobber.

        ``change(state)`` returns the fields to update, or None to leave the state as is.
        """
        key = run_key(run_id, "state")
        with self.client.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        raise RunNotFound(run_id)
                    state = RunState.model_validate_json(raw)
                    fields = change(state)
                    if fields is None:
                        return state
                    new = RunState.model_validate(
                        {**state.model_dump(), **fields, "updated_at": time.time()}
                    )
                    pipe.multi()
                    pipe.set(key, new.model_dump_json())
                    pipe.execute()
                    return new
                except redis.WatchError:
                    continue

    def update(self, run_id: str, **fields) -> RunState:
        return self._compare_and_set(run_id, lambda _: fields)

    def transition(self, run_id: str, allowed: frozenset[str], target: RunStatus) -> RunState:
        """Set the status to ``target`` only from one of ``allowed`` (a no-op if already there)."""

        def change(state: RunState):
            if state.status == target:
                return None
            if state.status not in allowed:
                raise InvalidTransition(
                    f"run {run_id} is {state.status}: cannot set it {target} "
                    f"(only from {', '.join(sorted(allowed))})"
                )
            return {"status": target}

        return self._compare_and_set(run_id, change)

    def set_status(self, run_id: str, status: RunStatus, error: str | None = None) -> RunState:
        fields: dict = {"status": status}
        if error is not None:
            fields["error"] = error
        return self.update(run_id, **fields)

    def record_restart(self, run_id: str, worker_id: str) -> RunState:
        """Count one restart of ``worker_id`` in the run's state."""

        def change(state: RunState) -> dict:
            return {"restarts": {**state.restarts, worker_id: state.restarts.get(worker_id, 0) + 1}}

        return self._compare_and_set(run_id, change)

    def list(self) -> list[RunState]:
        out = []
        for rid in self.client.zrange(RUNS_INDEX, 0, -1):
            try:
                out.append(self.state(rid.decode()))
            except RunNotFound:
                continue
        return out

    def active(self) -> list[RunState]:
        return [s for s in self.list() if s.status in ACTIVE]


def default_worker_id(kind: str) -> str:
    return f"{kind}-{socket.gethostname()}-{os.getpid()}"


def register_service(client: redis.Redis, kind: str, worker_id: str, info: dict, ttl_s: int = 15):
    """Heartbeat: the entry expires unless refreshed, so a dead service disappears."""
    payload = {"kind": kind, "worker_id": worker_id, "time": time.time(), **info}
    client.set(f"{SERVICES_PREFIX}{kind}:{worker_id}", json.dumps(payload), ex=ttl_s)


def live_services(client: redis.Redis) -> list[dict]:
    out = []
    for key in client.scan_iter(match=f"{SERVICES_PREFIX}*", count=200):
        raw = client.get(key)
        if raw:
            out.append(json.loads(raw))
    return sorted(out, key=lambda s: (s["kind"], s["worker_id"]))
