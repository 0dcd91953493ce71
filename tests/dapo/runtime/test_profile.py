"""The service shell splits a loop's time into phases (``dapo.runtime.profile``): handling
what was read is ``work``, reading the bus ``wait``, other bus calls ``bus``, sleeping on
purpose ``idle``; only the loop's thread is counted, and the phases never add up to more
than the wall time. Properties, not timings: the tests hold on a loaded machine."""

from __future__ import annotations

import threading
import time
import urllib.request

import redis
from prometheus_client.parser import text_string_to_metric_families

from dapo.runtime.config import ServiceSettings
from dapo.runtime.profile import PHASES, TimedBus
from dapo.runtime.runs import MemoryRunStore, RunStore
from dapo.runtime.service import ServiceContext, ServiceRuntime
from dapo.transport.memory_bus import MemoryBroker, MemoryBus
from proto.messages import PromptTask
from proto.runspec import RunSpec
from tests.factories import prompt_task

SLEEP_S = 0.01


def memory_context(broker: MemoryBroker | None = None) -> ServiceContext:
    store = MemoryRunStore()
    store.create(RunSpec(name="profile"), "r1")
    store.act("r1", "start")
    bus = MemoryBus("r1", broker=broker or MemoryBroker())
    return ServiceContext("reward", "r1", RunSpec(name="profile"), "reward-0", bus, store)


def sleepy_loop(ctx: ServiceContext, tasks: int) -> int:
    """Reads tasks one at a time and sleeps ``SLEEP_S`` on each, acking it; then reads the
    empty bus once more and idles. The number of tasks handled."""
    handled = 0
    while got := ctx.bus.consume("prompts", "g", "c", count=1, block_ms=10, expected=PromptTask):
        for d in got:
            time.sleep(SLEEP_S)
            ctx.bus.ack(d)
            handled += 1
    ctx.idle(SLEEP_S)
    return handled


def test_a_loop_that_works_waits_and_idles_accrues_each_phase_within_wall_time():
    ctx = memory_context()
    for i in range(5):
        ctx.bus.publish("prompts", prompt_task("r1", i))
    before = ctx.clock.seconds()  # the publishes above were counted already
    t0 = time.perf_counter()
    ctx.clock.start()
    assert sleepy_loop(ctx, 5) == 5
    wall = time.perf_counter() - t0
    seconds = {p: s - before[p] for p, s in ctx.clock.seconds().items()}
    assert set(seconds) == set(PHASES)
    assert seconds["work"] >= 5 * SLEEP_S  # the handler's sleeps are work, whatever the load
    assert seconds["wait"] > 0 and seconds["bus"] > 0 and seconds["idle"] > 0
    assert sum(seconds.values()) <= wall


def test_only_the_loop_thread_is_counted():
    """A keep-alive thread's ``touch`` runs beside the work: counted, phases would overlap."""
    ctx = memory_context()
    ctx.bus.publish("prompts", prompt_task("r1", 0))
    ctx.clock.start()
    got = ctx.bus.consume("prompts", "g", "c", count=1, expected=PromptTask)
    before = ctx.clock.seconds()["bus"]
    other = threading.Thread(target=lambda: [ctx.bus.touch(got) for _ in range(50)])
    other.start()
    other.join()
    assert ctx.clock.seconds()["bus"] == before


def test_a_bus_given_later_is_timed_on_the_same_clock():
    """The shell gives a loop a fresh bus after a Redis outage; tests swap buses too."""
    broker = MemoryBroker()
    ctx = memory_context(broker)
    first = ctx.bus
    ctx.bus = MemoryBus("r1", broker=broker)
    assert isinstance(ctx.bus, TimedBus) and ctx.bus is not first
    assert ctx.bus.clock is ctx.clock
    ctx.bus = first  # a timed bus is not wrapped twice
    assert ctx.bus.inner is first.inner
    ctx.clock.start()
    ctx.bus.publish("prompts", prompt_task("r1", 1))
    assert ctx.clock.seconds()["bus"] > 0


def test_the_runtime_exposes_the_phases_and_cpu_time_on_metrics(redis_url):
    """Real Redis, a real blocking read on an empty stream: ``wait`` on /metrics."""
    run_id = RunStore(redis.Redis.from_url(redis_url)).create(RunSpec(name="profile")).run_id
    settings = ServiceSettings(redis_url=redis_url, run_id=run_id)
    with ServiceRuntime("reward", settings) as rt:
        t0 = time.perf_counter()
        rt.serve(lambda: rt.ctx.bus.consume("prompts", "g", "c", count=1, block_ms=100))
        wall = time.perf_counter() - t0
        url = f"http://127.0.0.1:{rt.health.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
    samples = {
        (s.name, s.labels.get("phase")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    phases = {p: samples[("dapo_service_seconds_total", p)] for p in PHASES}
    assert phases["wait"] > 0
    assert sum(phases.values()) <= wall
    assert samples[("process_cpu_seconds_total", None)] > 0
