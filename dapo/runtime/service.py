"""The thin shell every service process runs in.

``ServiceRuntime`` connects to Redis, serves /healthz, /readyz and /metrics,
keeps a heartbeat in the service registry, turns SIGTERM/SIGINT into a
graceful stop, finds the run to serve, and hands the service an injected
``Bus``. A service's ``run(settings)`` is then only its own loop.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field

import redis
from prometheus_client import CollectorRegistry, Gauge

from dapo.runtime.config import ServiceSettings
from dapo.runtime.health import HealthServer
from dapo.runtime.runs import FINAL, RunNotFound, RunStore, default_worker_id, register_service
from dapo.transport.bus import BusSettings, RedisBus, connect
from proto.messages import RunState
from proto.runspec import RunSpec

log = logging.getLogger(__name__)


def setup_logging(kind: str, level: str) -> None:
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {kind:<8} %(levelname).1s %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )


def wait_for_redis(client: redis.Redis, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.ping()
            return
        except redis.ConnectionError as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"Redis not reachable after {timeout_s:.0f}s: {exc}") from None
            time.sleep(0.5)


@dataclass
class ServiceRuntime:
    kind: str
    settings: ServiceSettings
    bus_settings: BusSettings = field(default_factory=BusSettings)
    client: redis.Redis = field(init=False)
    registry: CollectorRegistry = field(init=False)
    store: RunStore = field(init=False)
    run_id: str = field(init=False, default="")
    spec: RunSpec = field(init=False)
    bus: RedisBus = field(init=False)
    worker_id: str = field(init=False)
    stop_event: threading.Event = field(init=False, default_factory=threading.Event)
    _state: RunState | None = field(init=False, default=None)
    _state_at: float = field(init=False, default=0.0)

    def __enter__(self) -> ServiceRuntime:
        setup_logging(self.kind, self.settings.log_level)
        self.worker_id = self.settings.worker_id or default_worker_id(self.kind)
        self.client = connect(self.settings.redis_url)
        self.registry = CollectorRegistry()
        self.health = HealthServer(
            self.registry, self._ready, self.settings.health_host, self.settings.health_port
        ).start()
        Gauge("dapo_up", "1 while the service runs", ["service"], registry=self.registry).labels(
            self.kind
        ).set(1)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop_event.set())
        wait_for_redis(self.client)
        self.store = RunStore(self.client)
        self._heartbeat = threading.Thread(target=self._beat, daemon=True)
        self._heartbeat.start()
        self.run_id = self.settings.run_id or self._wait_for_run()
        self.spec = self.store.spec(self.run_id)
        self.bus = RedisBus(self.client, self.run_id, self.bus_settings)
        log.info(
            "%s %s serving run %s (health :%d)",
            self.kind,
            self.worker_id,
            self.run_id,
            self.health.port,
        )
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        self.health.stop()

    def _ready(self) -> tuple[bool, str]:
        try:
            self.client.ping()
        except redis.RedisError as exc:
            return False, f"redis unreachable: {exc}"
        if not self.run_id:
            return False, "waiting for a run"
        return True, "ready"

    def _beat(self) -> None:
        while not self.stop_event.is_set():
            try:
                register_service(
                    self.client,
                    self.kind,
                    self.worker_id,
                    {"health_port": self.health.port, "run_id": self.run_id},
                )
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)
            self.stop_event.wait(5.0)

    def _wait_for_run(self) -> str:
        log.info("no DAPO_RUN_ID given: waiting for an active run")
        while not self.stop_event.is_set():
            active = self.store.active()
            if active:
                return active[-1].run_id
            self.stop_event.wait(1.0)
        raise SystemExit(0)

    # -- run state the loops consult -----------------------------------------
    def state(self, max_age_s: float = 0.5) -> RunState:
        now = time.monotonic()
        if self._state is None or now - self._state_at > max_age_s:
            try:
                self._state = self.store.state(self.run_id)
            except RunNotFound:
                self._state = RunState(run_id=self.run_id, status="failed", error="run deleted")
            self._state_at = now
        return self._state

    def should_stop(self) -> bool:
        """Signal received, or the run reached a final state."""
        return self.stop_event.is_set() or self.state().status in FINAL

    def stopping(self) -> bool:
        """The run asked for a graceful stop (drain, then exit)."""
        return self.should_stop() or self.state().status == "stopping"

    def paused(self) -> bool:
        """Paused by the user, or created but not yet started."""
        return self.state().status in ("paused", "pending")

    def idle(self, seconds: float) -> None:
        self.stop_event.wait(seconds)
