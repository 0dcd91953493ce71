"""Runs in Redis: the spec, the lifecycle state, and the registry of live services."""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from dataclasses import dataclass

import redis

from dapo.keys import RUNS_INDEX, check_run_id, run_key
from proto.messages import RunState, RunStatus
from proto.runspec import RunSpec

ACTIVE: frozenset[str] = frozenset({"pending", "running", "paused", "stopping"})
FINAL: frozenset[str] = frozenset({"stopped", "completed", "failed"})
SERVICES_PREFIX = "dapo:services:"


class RunNotFound(KeyError):
    pass


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

    def update(self, run_id: str, **fields) -> RunState:
        """Read-modify-write of the state under WATCH, so concurrent writers do not clobber."""
        key = run_key(run_id, "state")
        with self.client.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        raise RunNotFound(run_id)
                    state = RunState.model_validate_json(raw).model_copy(
                        update={**fields, "updated_at": time.time()}
                    )
                    RunState.model_validate(state.model_dump())
                    pipe.multi()
                    pipe.set(key, state.model_dump_json())
                    pipe.execute()
                    return state
                except redis.WatchError:
                    continue

    def set_status(self, run_id: str, status: RunStatus, error: str | None = None) -> RunState:
        fields: dict = {"status": status}
        if error is not None:
            fields["error"] = error
        return self.update(run_id, **fields)

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
