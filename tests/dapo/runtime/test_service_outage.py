"""The service shell rides out a Redis outage: the loop is entered again when Redis is
back, /readyz answers 503 with the reason meanwhile, a long outage exits non-zero, and
errors that are no outage still propagate. Redis here is a real server killed with
SIGKILL and started again on its append-only file."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request

import pytest
import redis

from dapo.runtime.config import ServiceSettings
from dapo.runtime.runs import RunStore
from dapo.runtime.service import RedisOutage, ServiceRuntime
from proto.runspec import RunSpec
from tests.factories import prompt_task
from tests.restartable_redis import RestartableRedis


def readyz(rt: ServiceRuntime) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{rt.health.port}/readyz", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def wait_for(predicate, timeout_s: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while not (found := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {predicate}"
        time.sleep(0.05)
    return found


def runtime_for(server: RestartableRedis, **settings) -> ServiceRuntime:
    run_id = RunStore(redis.Redis.from_url(server.url)).create(RunSpec(name="outage")).run_id
    return ServiceRuntime(
        "reward", ServiceSettings(redis_url=server.url, run_id=run_id, **settings)
    )


def holding_loop(rt: ServiceRuntime, seen: list[str]):
    """A consumer that holds what it reads unacknowledged, as the sampler holds kept groups."""

    def loop() -> None:
        while not rt.ctx.stop_event.is_set():
            got = rt.ctx.bus.consume("prompts", "g", "c", count=1, block_ms=50, reclaim=False)
            seen.extend(d.message.group_id for d in got)

    return loop


@pytest.mark.parametrize("fresh_bus", [True, False])
def test_the_loop_carries_on_after_redis_comes_back(tmp_path, fresh_bus):
    with RestartableRedis(tmp_path / "redis") as server:
        rt = runtime_for(server, redis_retry_max_s=0.2, redis_outage_max_s=120)
        with rt:
            bus, seen, errors = rt.ctx.bus, [], []
            bus.publish("prompts", prompt_task(rt.ctx.run_id, 0))

            def serve() -> None:
                try:
                    rt.serve(holding_loop(rt, seen), fresh_bus=fresh_bus)
                except BaseException as exc:  # reported to the test below
                    errors.append(exc)

            thread = threading.Thread(target=serve, daemon=True)
            thread.start()
            wait_for(lambda: seen, what="the first task")
            assert readyz(rt)[0] == 200
            server.kill()
            # 503 at once (/readyz pings Redis itself), then naming the outage waited out
            outage = wait_for(lambda: "redis outage" in (r := readyz(rt))[1] and r, what="503")
            assert outage[0] == 503 and "ConnectionError" in outage[1]
            time.sleep(1.0)  # several back-off rounds while Redis is down
            assert thread.is_alive() and not errors
            server.start()
            bus.publish("prompts", prompt_task(rt.ctx.run_id, 1))
            wait_for(lambda: seen[-1] == "g1", what="the task sent after the outage")
            assert readyz(rt)[0] == 200
            rt.ctx.stop_event.set()
            thread.join(timeout=30)
        assert not thread.is_alive() and not errors
        # A fresh bus re-reads what the consumer held (a re-entered loop has forgotten it);
        # the learner's bus does not, since it holds trained batches until a checkpoint.
        assert seen == (["g0", "g0", "g1"] if fresh_bus else ["g0", "g1"])
        assert (rt.ctx.bus is bus) is not fresh_bus


def test_an_outage_longer_than_the_bound_exits_with_the_reason(tmp_path):
    with RestartableRedis(tmp_path / "redis") as server:
        rt = runtime_for(server, redis_retry_max_s=0.1, redis_outage_max_s=1.0)
        with rt:
            calls = []

            def loop() -> None:
                calls.append(1)
                if len(calls) == 1:
                    server.kill()
                rt.ctx.store.state(rt.ctx.run_id)

            with pytest.raises(RedisOutage, match="DAPO_REDIS_OUTAGE_MAX_S"):
                rt.serve(loop)
        assert calls == [1]


def test_errors_that_are_no_outage_propagate_at_once(tmp_path):
    with RestartableRedis(tmp_path / "redis") as server, runtime_for(server) as rt:
        for error in (ValueError("bad entry"), redis.AuthenticationError("wrong password")):
            calls = []

            def loop(error=error, calls=calls) -> None:
                calls.append(1)
                raise error

            with pytest.raises(type(error)):
                rt.serve(loop)
            assert calls == [1]


def test_a_stop_during_the_outage_ends_the_loop(tmp_path):
    with RestartableRedis(tmp_path / "redis") as server, runtime_for(server) as rt:

        def loop() -> None:
            server.kill()
            threading.Timer(0.5, rt.ctx.stop_event.set).start()  # SIGTERM during the outage
            rt.ctx.store.state(rt.ctx.run_id)

        rt.serve(loop)  # returns: the process exits as after any stop
