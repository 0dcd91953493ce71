"""The run store: every run's spec, lifecycle record, latest step report and account, plus
the registry of live service processes.

``RunStore`` keeps them in Redis under ``proto.keys``; ``MemoryRunStore`` keeps them in a
dict for fast tests of service loops. Both follow the one lifecycle table of
``proto.lifecycle``: users move a run with ``act`` (start, stop, pause, resume), services
end it with ``finish``; a final state is never left.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import redis

from dapo.transport.bus import Fence, FencedOut, check_fence
from proto.keys import ACTIVE_RUNS, RUNS_INDEX, SERVICES_PREFIX, RunKeys, check_run_id
from proto.lifecycle import ACTIONS, ACTIVE, ENDINGS, RunStatus
from proto.runspec import RunSpec
from proto.state import RunState, StepReport, account_from_counters

Change = Callable[[RunState], dict | None]
"""Given the current state, the fields to update (None: leave it as is)."""


class RunNotFound(KeyError):
    pass


class InvalidTransition(ValueError):
    """A status change the run's lifecycle does not allow (e.g. resume a stopped run)."""


def new_run_id(spec: RunSpec) -> str:
    return f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def _action(run_id: str, action: str) -> Change:
    allowed, target = ACTIONS[action]

    def change(state: RunState) -> dict | None:
        if state.status == target:
            return None  # asking for the state the run is in: a no-op
        if state.status not in allowed:
            raise InvalidTransition(
                f"run {run_id} is {state.status}: cannot {action} it "
                f"(only from {', '.join(sorted(allowed))})"
            )
        return {"status": target}

    return change


def _ending(status: RunStatus, error: str | None, final_checkpoint: str | None) -> Change:
    def change(state: RunState) -> dict | None:
        fields: dict = {}
        if final_checkpoint is not None:
            fields["final_checkpoint"] = final_checkpoint
        if state.status in ENDINGS[status]:
            fields["status"] = status
            if error is not None:
                fields["error"] = error[:4000]
        return fields or None  # already final: the first ending stands

    return change


class Runs(Protocol):
    """What services need of the run store."""

    def spec(self, run_id: str) -> RunSpec: ...
    def state(self, run_id: str) -> RunState: ...
    def update(self, run_id: str, **fields) -> RunState: ...
    def finish(
        self,
        run_id: str,
        status: RunStatus,
        error: str | None = None,
        final_checkpoint: str | None = None,
    ) -> RunState: ...
    def report_step(self, run_id: str, report: StepReport) -> None: ...


class _Lifecycle:
    """The moves shared by both stores, written once over ``_compare_and_set``."""

    def _compare_and_set(self, run_id: str, change: Change) -> RunState:
        raise NotImplementedError

    def update(self, run_id: str, **fields) -> RunState:
        return self._compare_and_set(run_id, lambda _: fields)

    def act(self, run_id: str, action: str) -> RunState:
        """A user's move (``proto.lifecycle.ACTIONS``); InvalidTransition when not allowed."""
        return self._compare_and_set(run_id, _action(run_id, action))

    def finish(
        self,
        run_id: str,
        status: RunStatus,
        error: str | None = None,
        final_checkpoint: str | None = None,
    ) -> RunState:
        """A service ends the run (completed, stopped or failed, with why); a run that has
        already ended keeps its first ending."""
        return self._compare_and_set(run_id, _ending(status, error, final_checkpoint))

    def set_status(self, run_id: str, status: RunStatus, error: str | None = None) -> RunState:
        """Set the status unconditionally (set-up and tests; services use ``finish``)."""
        return self.update(run_id, status=status, **({"error": error} if error else {}))

    def record_restart(self, run_id: str, worker_id: str) -> RunState:
        """Count one restart of ``worker_id`` in the run's state."""

        def change(state: RunState) -> dict:
            return {"restarts": {**state.restarts, worker_id: state.restarts.get(worker_id, 0) + 1}}

        return self._compare_and_set(run_id, change)

    def record_startup_failure(self, run_id: str, kind: str, error: str, limit: int) -> RunState:
        """Count a failed start-up of a ``kind`` service; the ``limit``-th in a row fails the
        run with ``error`` (``limit`` 1: at once). Counted per kind, not per process: a
        restarted process has a new worker id, and a kind that cannot start stops the run
        whichever of its replicas tries. An ended run is left as it is."""
        error = error[:4000]

        def change(state: RunState) -> dict | None:
            if state.status not in ACTIVE:
                return None
            before = state.startup_failures.get(kind)
            count = (before.count if before else 0) + 1
            failures = {**state.startup_failures, kind: {"count": count, "error": error}}
            fields: dict = {"startup_failures": failures}
            if count >= limit:
                times = f" ({count} start-ups in a row)" if limit > 1 else ""
                fields |= {"status": "failed", "error": f"{error}{times}"[:4000]}
            return fields

        return self._compare_and_set(run_id, change)

    def clear_startup_failures(self, run_id: str, kind: str) -> RunState:
        """A ``kind`` service reached its loop: its earlier failed start-ups are history."""

        def change(state: RunState) -> dict | None:
            if kind not in state.startup_failures:
                return None
            return {
                "startup_failures": {k: v for k, v in state.startup_failures.items() if k != kind}
            }

        return self._compare_and_set(run_id, change)

    def list(self) -> list[RunState]:
        raise NotImplementedError

    def active(self) -> list[RunState]:
        return [s for s in self.list() if s.status in ACTIVE]


def _apply(state: RunState, change: Change) -> RunState | None:
    fields = change(state)
    if fields is None:
        return None
    return RunState.model_validate({**state.model_dump(), **fields, "updated_at": time.time()})


@dataclass
class RunStore(_Lifecycle):
    """The run store in Redis; with a ``fence`` every write is fenced by a lease
    (``dapo.runtime.lease``), reads are not."""

    client: redis.Redis
    fence: Fence | None = None

    def create(self, spec: RunSpec, run_id: str | None = None) -> RunState:
        keys = RunKeys(run_id or new_run_id(spec))
        state = RunState(run_id=keys.run_id)
        if not self.client.set(keys.spec, spec.model_dump_json(), nx=True):
            raise ValueError(f"run {keys.run_id} already exists")
        pipe = self.client.pipeline(transaction=True)
        pipe.set(keys.state, state.model_dump_json())
        pipe.zadd(RUNS_INDEX, {keys.run_id: state.created_at})
        pipe.sadd(ACTIVE_RUNS, keys.run_id)
        pipe.execute()
        return state

    def spec(self, run_id: str) -> RunSpec:
        raw = self.client.get(RunKeys(run_id).spec)
        if raw is None:
            raise RunNotFound(run_id)
        return RunSpec.model_validate_json(raw)

    def state(self, run_id: str) -> RunState:
        raw = self.client.get(RunKeys(run_id).state)
        if raw is None:
            raise RunNotFound(run_id)
        return RunState.model_validate_json(raw)

    def _compare_and_set(self, run_id: str, change: Change) -> RunState:
        """Read-modify-write under WATCH, so concurrent writers do not clobber each other."""
        key = RunKeys(run_id).state
        with self.client.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key, *([self.fence[0]] if self.fence else []))
                    check_fence(pipe, self.fence)
                    raw = pipe.get(key)
                    if raw is None:
                        raise RunNotFound(run_id)
                    state = RunState.model_validate_json(raw)
                    new = _apply(state, change)
                    if new is None:
                        return state
                    pipe.multi()
                    pipe.set(key, new.model_dump_json())
                    if new.status in ACTIVE:  # the index of active runs follows the state
                        pipe.sadd(ACTIVE_RUNS, run_id)
                    else:
                        pipe.srem(ACTIVE_RUNS, run_id)
                    pipe.execute()
                    return new
                except redis.WatchError:
                    continue

    def report_step(self, run_id: str, report: StepReport) -> None:
        with self.client.pipeline() as pipe:
            try:
                if self.fence is not None:
                    pipe.watch(self.fence[0])
                    check_fence(pipe, self.fence)
                pipe.multi()
                pipe.set(RunKeys(run_id).report, report.model_dump_json())
                pipe.execute()
            except redis.WatchError:  # only the fence key is watched: the lease moved
                raise FencedOut(f"lease {self.fence[0]} moved during a write") from None

    def latest_report(self, run_id: str) -> StepReport | None:
        raw = self.client.get(RunKeys(run_id).report)
        return StepReport.model_validate_json(raw) if raw else None

    def account(self, run_id: str) -> dict[str, int]:
        """The sampler's account of the run's prompts (``proto.state.ACCOUNT_FIELDS``)."""
        return account_from_counters(self.client.hgetall(RunKeys(run_id).account))

    def list(self) -> list[RunState]:
        return self._states(r.decode() for r in self.client.zrange(RUNS_INDEX, 0, -1))

    def active(self) -> list[RunState]:
        """The active runs, oldest first, from their index: the cost does not grow with the
        runs that have ended."""
        ids = sorted(r.decode() for r in self.client.smembers(ACTIVE_RUNS))
        states = [s for s in self._states(ids) if s.status in ACTIVE]
        return sorted(states, key=lambda s: s.created_at)

    def _states(self, run_ids) -> list[RunState]:
        out = []
        for rid in run_ids:
            try:
                out.append(self.state(rid))
            except (RunNotFound, ValueError):  # gone, or not a run id this store wrote
                continue
        return out


@dataclass
class MemoryRunStore(_Lifecycle):
    """The run store in a dict: the same lifecycle rules, for tests of service loops."""

    specs: dict[str, RunSpec] = field(default_factory=dict)
    states: dict[str, RunState] = field(default_factory=dict)
    reports: dict[str, StepReport] = field(default_factory=dict)

    def create(self, spec: RunSpec, run_id: str | None = None) -> RunState:
        run_id = check_run_id(run_id or new_run_id(spec))
        if run_id in self.specs:
            raise ValueError(f"run {run_id} already exists")
        self.specs[run_id], self.states[run_id] = spec, RunState(run_id=run_id)
        return self.states[run_id]

    def spec(self, run_id: str) -> RunSpec:
        if run_id not in self.specs:
            raise RunNotFound(run_id)
        return self.specs[run_id]

    def state(self, run_id: str) -> RunState:
        if run_id not in self.states:
            raise RunNotFound(run_id)
        return self.states[run_id]

    def _compare_and_set(self, run_id: str, change: Change) -> RunState:
        new = _apply(self.state(run_id), change)
        if new is not None:
            self.states[run_id] = new
        return self.states[run_id]

    def report_step(self, run_id: str, report: StepReport) -> None:
        self.reports[run_id] = report

    def list(self) -> list[RunState]:
        return sorted(self.states.values(), key=lambda s: s.created_at)


def default_worker_id(kind: str) -> str:
    return f"{kind}-{socket.gethostname()}-{os.getpid()}"


def register_service(client: redis.Redis, kind: str, worker_id: str, info: dict, ttl_s: int = 15):
    """Heartbeat: the entry expires unless refreshed, so a dead service disappears."""
    payload = {"kind": kind, "worker_id": worker_id, "time": time.time(), **info}
    client.set(f"{SERVICES_PREFIX}{kind}:{worker_id}", json.dumps(payload), ex=ttl_s)


def live_services(client: redis.Redis) -> list[dict]:
    """The registered services; an entry that is not a service's heartbeat (anyone with
    access to Redis can write one) is skipped, not trusted."""
    out = []
    for key in client.scan_iter(match=f"{SERVICES_PREFIX}*", count=200):
        raw = client.get(key)
        try:
            entry = json.loads(raw) if raw else None
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("kind"), str):
            if isinstance(entry.get("worker_id"), str):
                out.append(entry)
    return sorted(out, key=lambda s: (s["kind"], s["worker_id"]))
