"""Where a service loop's time goes: each second of its thread in exactly one phase.

The loop thread is always in one of ``PHASES``:

- ``wait``: blocked reading the bus (``Bus.consume``); a read that returns work counts its
  transfer here too, since a blocking read cannot tell the two apart;
- ``bus``: every other bus call (publish, commit, ack, reject, touch, queries);
- ``idle``: sleeping on purpose (``ServiceContext.idle``: paused, backing off);
- ``work``: everything else, i.e. handling what was read (generation, scoring, training,
  weight sync, the run store).

``PhaseClock`` switches phase around those calls and adds each finished stretch to the
counter ``dapo_service_seconds_total{component, phase}``; ``TimedBus`` is the bus a loop is
given, timing its calls. Two ``time.perf_counter`` reads and one counter increment per bus
call: nothing a loop that talks to Redis would notice. Only the loop's own thread is timed
(the first one that starts the clock or calls the bus): the keep-alive thread's ``touch``
runs beside the work, and counting it would make the phases overlap.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter

from dapo.transport.bus import Bus, Delivery

PHASES = ("wait", "bus", "idle", "work")
"""The phases of a loop's time; together they account for all of it."""
SECONDS_METRIC = "dapo_service_seconds"
"""Prometheus exposes it as ``dapo_service_seconds_total``."""


class PhaseClock:
    """Splits the loop thread's wall time into ``PHASES``; the stretch in progress is counted
    when it ends, so the counters never run ahead of the wall clock."""

    def __init__(self, registry: CollectorRegistry, component: str) -> None:
        counter = Counter(
            SECONDS_METRIC,
            "Seconds of the service loop's thread by phase (wait, bus, idle, work)",
            ["component", "phase"],
            registry=registry,
        )
        self._seconds = {p: counter.labels(component, p) for p in PHASES}
        self._registry, self._component = registry, component
        self._thread: int | None = None
        self._phase = "work"
        self._since = 0.0

    def start(self) -> None:
        """The calling thread is the loop's, from now on: what came before (model loading,
        start-up) is no phase of the loop."""
        self._thread = threading.get_ident()
        self._phase, self._since = "work", time.perf_counter()

    def seconds(self) -> dict[str, float]:
        """Seconds counted so far, by phase."""
        name, component = f"{SECONDS_METRIC}_total", self._component
        return {
            p: self._registry.get_sample_value(name, {"component": component, "phase": p}) or 0.0
            for p in PHASES
        }

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """The block runs in phase ``name``; on another thread than the loop's, or inside
        another phase (a bus call made while waiting), it is not counted apart."""
        if self._thread is None:
            self.start()
        if self._thread != threading.get_ident() or self._phase != "work":
            yield
            return
        self._switch(name)
        try:
            yield
        finally:
            self._switch("work")

    def _switch(self, name: str) -> None:
        now = time.perf_counter()
        self._seconds[self._phase].inc(now - self._since)
        self._phase, self._since = name, now


class TimedBus:
    """A ``Bus`` that times the calls of the loop thread on ``clock``; anything else (a
    bus's ``fence``, say) is the wrapped bus's own."""

    def __init__(self, inner: Bus, clock: PhaseClock) -> None:
        self.inner = inner
        self.clock = clock

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def consume(self, stream: str, group: str, consumer: str, **kw) -> list[Delivery]:
        with self.clock.phase("wait"):
            return self.inner.consume(stream, group, consumer, **kw)

    def fetch(self, stream: str, entry_ids: Sequence[str], expected=None) -> list:
        with self.clock.phase("bus"):
            return self.inner.fetch(stream, entry_ids, expected)

    def publish(self, stream: str, msg, **kw):
        with self.clock.phase("bus"):
            return self.inner.publish(stream, msg, **kw)

    def publish_many(self, *args, **kw):
        with self.clock.phase("bus"):
            return self.inner.publish_many(*args, **kw)

    def commit(self, *args, **kw):
        with self.clock.phase("bus"):
            return self.inner.commit(*args, **kw)

    def ack(self, delivery: Delivery) -> None:
        with self.clock.phase("bus"):
            self.inner.ack(delivery)

    def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        with self.clock.phase("bus"):
            self.inner.ack_many(deliveries)

    def reject(self, delivery: Delivery, reason: str) -> None:
        with self.clock.phase("bus"):
            self.inner.reject(delivery, reason)

    def nack(self, delivery: Delivery, reason: str) -> None:
        with self.clock.phase("bus"):
            self.inner.nack(delivery, reason)

    def touch(self, deliveries: Sequence[Delivery]) -> None:
        with self.clock.phase("bus"):
            self.inner.touch(deliveries)

    def read(self, stream: str, after: str = "0-0"):
        with self.clock.phase("bus"):
            return self.inner.read(stream, after)

    def counters(self, counter: str) -> dict[str, int]:
        with self.clock.phase("bus"):
            return self.inner.counters(counter)

    def dead_count(self, stream: str | None = None) -> int:
        with self.clock.phase("bus"):
            return self.inner.dead_count(stream)

    def lag(self, stream: str):
        with self.clock.phase("bus"):
            return self.inner.lag(stream)

    def length(self, stream: str) -> int:
        with self.clock.phase("bus"):
            return self.inner.length(stream)
