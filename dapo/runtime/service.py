"""The thin shell every service process runs in, and what a service loop sees of it.

``ServiceContext`` is a loop's whole world: its run (id and spec), its worker id,
the injected ``Bus`` and run store, its metrics registry and the lifecycle
questions (stop? drain? paused?). Tests build one over ``MemoryBus`` and
``MemoryRunStore``.

``ServiceRuntime`` builds the real one: it connects to Redis, serves /healthz,
/readyz and /metrics, keeps a heartbeat in the service registry, turns
SIGTERM/SIGINT into a graceful stop and finds the run to serve. A service's
``main`` is then: settings, runtime, the things only it owns, its loop, run by
``ServiceRuntime.serve``.

Two kinds of trouble are handled here, once for every service:

- a Redis outage (a restart, a failover, a network blip) raised by the loop is
  waited out with a bounded back-off while /readyz answers 503, then the loop is
  entered again (``ServiceRuntime.serve``);
- a start-up that fails (anything raised before the loop begins) is recorded in
  the run's state, and fails the run when no restart can help
  (``ServiceRuntime.startup_failed``).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector
from pydantic import ValidationError

from dapo.data.dataset import DatasetError
from dapo.runtime.config import ConfigError, ServiceSettings
from dapo.runtime.health import HealthServer
from dapo.runtime.profile import PhaseClock, TimedBus
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


OUTAGE_ERRORS = (redis.ConnectionError, redis.TimeoutError)
"""What a Redis outage raises; ``BusyLoadingError`` (a restarted server still loading its
data) is a ``ConnectionError``."""
FIRST_RETRY_S = 0.1
"""First pause before trying Redis again in an outage; it doubles up to
``redis_retry_max_s``."""
RESTART_CANNOT_FIX = (ConfigError, DatasetError, ValidationError, ImportError, FileNotFoundError)
"""Start-up errors that come from the run's own inputs (a spec this service cannot read, a
dataset row, a missing model directory or package): every restart would fail the same way."""


class RedisOutage(RuntimeError):
    """Redis stayed unreachable longer than ``redis_outage_max_s``."""


def is_outage(exc: BaseException) -> bool:
    """A Redis error that waiting can cure; a refused login (an ``AuthenticationError``,
    also a ``ConnectionError``) is not one."""
    return isinstance(exc, OUTAGE_ERRORS) and not isinstance(exc, redis.AuthenticationError)


def probe_client(client: redis.Redis, timeout_s: float) -> redis.Redis:
    """A client to the same server, login and TLS as ``client`` that gives up on a silent
    server within ``timeout_s`` (the services' own client waits far longer for a reply)."""
    pool = client.connection_pool
    kwargs = {**pool.connection_kwargs, "socket_timeout": timeout_s}
    kwargs["socket_connect_timeout"] = timeout_s
    return redis.Redis(
        connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **kwargs)
    )


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
    clock: PhaseClock = field(init=False, repr=False)
    """Where the loop's time goes (``dapo.runtime.profile``): the bus is timed through it."""

    def __setattr__(self, name: str, value) -> None:
        # the shell (after an outage) and tests give a loop a new bus: it is timed too
        if name == "bus" and "clock" in self.__dict__:
            inner = value.inner if isinstance(value, TimedBus) else value
            value = TimedBus(inner, self.clock)
        object.__setattr__(self, name, value)

    def __post_init__(self) -> None:
        self.clock = PhaseClock(self.registry, self.kind)
        self.bus = self.bus
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
        with self.clock.phase("idle"):
            self.stop_event.wait(seconds)

    def fail(self, error: str) -> None:
        """The run cannot go on because of this service: say why where the user looks."""
        log.error("%s", error)
        self.store.finish(self.run_id, "failed", error=f"{self.kind} {self.worker_id}: {error}")


@dataclass
class ServiceRuntime:
    """``with ServiceRuntime(kind, settings) as rt``: ``rt.ctx`` for the loop, ``rt.client``
    for what only a process owns (the weight-sync rendezvous); ``rt.serve(loop)`` runs the
    loop. An exception that leaves the block before ``serve`` began is a failed start-up."""

    kind: str
    settings: ServiceSettings
    bus_settings: BusSettings = field(default_factory=BusSettings)
    client: redis.Redis = field(init=False)
    ctx: ServiceContext = field(init=False)
    worker_id: str = field(init=False, default="")
    _run_id: str = field(init=False, default="")
    _stop: threading.Event = field(init=False, default_factory=threading.Event)
    _serving: bool = field(init=False, default=False)
    _outage: tuple[float, str] | None = field(init=False, default=None)
    """(monotonic start, error) of the Redis outage being waited out; None when there is none."""

    def __enter__(self) -> ServiceRuntime:
        setup_logging(self.kind, self.settings.log_level)
        self.worker_id = self.settings.worker_id or default_worker_id(self.kind)
        self.client = redis_client(self.settings)
        registry = CollectorRegistry()
        self.health = HealthServer(
            registry, self._ready, self.settings.health_host, self.settings.health_port
        ).start()
        Gauge("dapo_up", "1 while the service runs", ["service"], registry=registry).labels(
            self.kind
        ).set(1)
        self._outages = Counter(
            "dapo_redis_outages", "Redis outages ridden out", ["service"], registry=registry
        ).labels(self.kind)
        ProcessCollector(registry=registry)  # CPU seconds and memory of the process
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        wait_for_redis(self.client)
        store = RunStore(self.client)
        threading.Thread(target=self._beat, args=(self.worker_id,), daemon=True).start()
        self._run_id = self.settings.run_id or self._wait_for_run(store)
        try:
            spec = store.spec(self._run_id)
            bus = RedisBus(self.client, self._run_id, self.bus_settings)
        except Exception as exc:  # __exit__ is not called when __enter__ raises
            self.startup_failed(exc)
            raise
        self.ctx = ServiceContext(
            self.kind, self._run_id, spec, self.worker_id, bus, store, registry, self._stop
        )
        log.info(
            "%s %s serving run %s (health :%d)",
            self.kind,
            self.worker_id,
            self._run_id,
            self.health.port,
        )
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if isinstance(exc, Exception) and not self._serving:
            self.startup_failed(exc)
        self._stop.set()
        self.health.stop()

    def serve(self, loop: Callable[[], None], fresh_bus: bool = True) -> None:
        """Runs the service loop until it returns, riding out Redis outages.

        A Redis outage (``is_outage``) raised by the loop is logged once; /readyz answers
        503 with the reason while Redis is tried again with a back-off (``_wait_out``);
        once it answers, the loop is entered again. That is safe because every step of a
        loop publishes, acknowledges and counts in one transaction with an idempotency key:
        a step cut short had all of its effect or none, and its input is still pending.
        With ``fresh_bus`` the loop gets a new bus, whose consumers first re-read their
        own pending entries (what they held when Redis went away, or took in a read whose
        reply was lost) instead of leaving them to the reclaim. The learner keeps its bus:
        it holds trained batches pending until a checkpoint and must not get them back.
        An outage longer than ``redis_outage_max_s`` raises ``RedisOutage``, so the process
        exits non-zero and is restarted; any other error propagates as it is.
        """
        self._serving = True
        self._clear_startup_failures()
        self.ctx.clock.start()  # the loop's time starts here, not at model loading
        while True:
            try:
                loop()
                return
            except redis.RedisError as exc:
                if not is_outage(exc):
                    raise
                if not self._wait_out(exc):
                    return  # asked to stop while Redis was away
            if fresh_bus:
                fence = getattr(self.ctx.bus, "fence", None)
                self.ctx.bus = RedisBus(self.client, self._run_id, self.bus_settings, fence)

    def _wait_out(self, exc: Exception) -> bool:
        """Tries Redis until it answers (True) or a stop is asked for (False); raises
        ``RedisOutage`` once the outage has lasted ``redis_outage_max_s``."""
        limit, cap = self.settings.redis_outage_max_s, self.settings.redis_retry_max_s
        start, reason = time.monotonic(), f"{type(exc).__name__}: {exc}"
        self._outage = (start, reason)
        self._outages.inc()
        log.warning("redis unreachable (%s): trying again for up to %.0fs", reason, limit)
        probe, delay = probe_client(self.client, cap), FIRST_RETRY_S
        try:
            while not self._stop.wait(delay):
                try:
                    probe.ping()
                    log.info("redis answers again after %.1fs", time.monotonic() - start)
                    return True
                except redis.RedisError as err:
                    if not is_outage(err):
                        raise
                    reason = f"{type(err).__name__}: {err}"
                if time.monotonic() - start >= limit:
                    raise RedisOutage(
                        f"redis unreachable for {limit:.0f}s (DAPO_REDIS_OUTAGE_MAX_S): {reason}"
                    ) from exc
                delay = min(2 * delay, cap)
            return False
        finally:
            probe.close()
            self._outage = None

    def startup_failed(self, exc: Exception) -> None:
        """Records in the run's state that this service could not start, and why.

        An operator expects a run that cannot start to say so, not to stay ``running``
        while pods crash-loop; and a passing hiccup (a busy device, a port not yet free,
        a slow file system) not to end a run that a restart would carry on. So an error
        that comes from the run's own inputs (``RESTART_CANNOT_FIX``) fails the run at
        once with its reason; any other counts against ``startup_failure_limit`` start-ups
        of this kind in a row (``Runs.record_startup_failure``), and a start-up that
        reaches its loop clears the count. A Redis outage is not recorded: there is no
        Redis to record it in, and it passes.
        """
        if not self._run_id or is_outage(exc):
            return
        permanent = isinstance(exc, RESTART_CANNOT_FIX)
        limit = 1 if permanent else self.settings.startup_failure_limit
        error = f"{self.kind} {self.worker_id} could not start: {type(exc).__name__}: {exc}"
        try:
            state = RunStore(self.client).record_startup_failure(
                self._run_id, self.kind, error, limit
            )
        except (redis.RedisError, RunNotFound) as err:
            log.warning("start-up failure not recorded in run %s: %s", self._run_id, err)
            return
        log.error("%s (run %s is %s)", error, self._run_id, state.status)

    def _clear_startup_failures(self) -> None:
        try:
            RunStore(self.client).clear_startup_failures(self._run_id, self.kind)
        except (redis.RedisError, RunNotFound) as err:  # the loop meets the same trouble
            log.warning("start-up failures of %s not cleared: %s", self.kind, err)

    def _ready(self) -> tuple[bool, str]:
        outage = self._outage
        if outage is not None:
            since, reason = outage
            return False, (
                f"redis outage for {time.monotonic() - since:.0f}s, retrying (giving up after "
                f"{self.settings.redis_outage_max_s:.0f}s): {reason}"
            )
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
                if self._outage is None:  # an outage being waited out is logged once
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
