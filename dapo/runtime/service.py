"""The thin shell every service process runs in, and what a service loop sees of it.

``ServiceContext`` is a loop's whole world: its run (id and spec), its worker id,
the injected ``Bus`` and run store, its metrics registry and the lifecycle
questions (stop? drain? paused?). Tests build one over ``MemoryBus`` and
``MemoryRunStore``.

``ServiceRuntime`` builds the real one: it connects to Redis, serves /healthz,
/readyz and /metrics, keeps a heartbeat in the service registry, turns
SIGTERM/SIGINT into a graceful stop and finds the run to serve. A service's
``main`` is then: settings, runtime, the things only it owns, its loop.
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
from dapo.runtime.runs import RunNotFound, Runs, RunStore, default_worker_id, register_service
from dapo.transport.bus import Bus, BusSettings
from dapo.transport.redis_bus import RedisBus, connect
from proto.lifecycle import FINAL
from proto.runspec import RunSpec
from proto.state import RunState

log = logging.getLogger(__name__)


def setup_logging(kind: str, level: str) -> None:
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {kind:<8} %(levelname).1s %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )


PROGRESS_METRIC = "dapo_last_progress_timestamp_seconds"
"""Gauge every service sets when it gets work done (``ServiceContext.progress``): the
watchdog alerts and the dashboard read how long ago that was."""


def redis_client(settings: ServiceSettings) -> redis.Redis:
    """The client a service talks to its run with: URL, login (from the Secret-fed settings,
    never from the URL) and TLS verification, the same for every service."""
    password = settings.redis_password
    return connect(
        settings.redis_url,
        password=None if password is None else password.get_secret_value(),
        username=settings.redis_username or None,
        tls_ca=settings.redis_tls_ca,
    )


def wait_for_redis(client: redis.Redis, timeout_s: float = 60.0) -> None:
    """Waits for Redis to come up; a refused login fails at once, since waiting cannot fix it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.ping()
            return
        except redis.AuthenticationError as exc:
            raise RuntimeError(f"Redis refused the login (DAPO_REDIS_PASSWORD?): {exc}") from None
        except redis.ConnectionError as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"Redis not reachable after {timeout_s:.0f}s: {exc}") from None
            time.sleep(0.5)


@dataclass
class ServiceContext:
    """What a service loop needs: its run, its channels, its lifecycle."""

    kind: str
    run_id: str
    spec: RunSpec
    worker_id: str
    bus: Bus
    store: Runs
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    stop_event: threading.Event = field(default_factory=threading.Event)
    _state: RunState | None = field(init=False, default=None)
    _state_at: float = field(init=False, default=0.0)
    _progress: Gauge = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # On the context's registry, so loops built over a bare context (tests) have it too;
        # set at start, so a service that never gets anything done still shows its age.
        self._progress = Gauge(
            PROGRESS_METRIC,
            "Unix time of the service's last progress (work published or trained)",
            ["component"],
            registry=self.registry,
        ).labels(self.kind)
        self._progress.set_to_current_time()

    def state(self, max_age_s: float = 0.5) -> RunState:
        """The run's lifecycle record, re-read at most every ``max_age_s`` seconds."""
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

    def progress(self) -> None:
        """Marks work done (a group published or scored, a batch out, a step trained): a
        run whose services stop calling this is hung, whatever their health checks say."""
        self._progress.set_to_current_time()

    def idle(self, seconds: float) -> None:
        self.stop_event.wait(seconds)

    def fail(self, error: str) -> None:
        """The run cannot go on because of this service: say why where the user looks."""
        log.error("%s", error)
        self.store.finish(self.run_id, "failed", error=f"{self.kind} {self.worker_id}: {error}")


@dataclass
class ServiceRuntime:
    """``with ServiceRuntime(kind, settings) as rt``: ``rt.ctx`` for the loop, ``rt.client``
    for what only a process owns (the weight-sync rendezvous)."""

    kind: str
    settings: ServiceSettings
    bus_settings: BusSettings = field(default_factory=BusSettings)
    client: redis.Redis = field(init=False)
    ctx: ServiceContext = field(init=False)
    _run_id: str = field(init=False, default="")
    _stop: threading.Event = field(init=False, default_factory=threading.Event)

    def __enter__(self) -> ServiceRuntime:
        setup_logging(self.kind, self.settings.log_level)
        worker_id = self.settings.worker_id or default_worker_id(self.kind)
        self.client = redis_client(self.settings)
        registry = CollectorRegistry()
        self.health = HealthServer(
            registry, self._ready, self.settings.health_host, self.settings.health_port
        ).start()
        Gauge("dapo_up", "1 while the service runs", ["service"], registry=registry).labels(
            self.kind
        ).set(1)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        wait_for_redis(self.client)
        store = RunStore(self.client)
        threading.Thread(target=self._beat, args=(worker_id,), daemon=True).start()
        self._run_id = self.settings.run_id or self._wait_for_run(store)
        self.ctx = ServiceContext(
            self.kind,
            self._run_id,
            store.spec(self._run_id),
            worker_id,
            RedisBus(self.client, self._run_id, self.bus_settings),
            store,
            registry,
            self._stop,
        )
        log.info(
            "%s %s serving run %s (health :%d)",
            self.kind,
            worker_id,
            self._run_id,
            self.health.port,
        )
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.health.stop()

    def _ready(self) -> tuple[bool, str]:
        try:
            self.client.ping()
        except redis.RedisError as exc:
            return False, f"redis unreachable: {exc}"
        if not self._run_id:
            return False, "waiting for a run"
        return True, "ready"

    def _beat(self, worker_id: str) -> None:
        while not self._stop.is_set():
            try:
                register_service(
                    self.client,
                    self.kind,
                    worker_id,
                    {"health_port": self.health.port, "run_id": self._run_id},
                )
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)
            self._stop.wait(5.0)

    def _wait_for_run(self, store: RunStore) -> str:
        log.info("no DAPO_RUN_ID given: waiting for an active run")
        while not self._stop.is_set():
            active = store.active()
            if active:
                return active[-1].run_id
            self._stop.wait(1.0)
        raise SystemExit(0)
