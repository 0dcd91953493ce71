"""A real reward process rides out Redis killed and started again: it stays alive, answers
/readyz 503 with the reason meanwhile, logs the outage once, and scores what comes after,
each group exactly once."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import redis

from dapo.cli.stack import Proc, Stack
from dapo.runtime.runs import RunStore
from dapo.transport.redis_bus import RedisBus
from tests.e2e_helpers import make_dataset, make_model_dir, small_spec
from tests.factories import rollout_group
from tests.restartable_redis import RestartableRedis


def readyz(proc: Proc) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{proc.port}/readyz", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError as err:
        return 0, str(err)


def wait_for(predicate, proc: Proc, what: str, timeout_s: float = 120.0):
    deadline = time.monotonic() + timeout_s
    while not (found := predicate()):
        assert proc.popen.poll() is None, proc.log_path.read_text()
        assert time.monotonic() < deadline, f"no {what}:\n{proc.log_path.read_text()[-3000:]}"
        time.sleep(0.1)
    return found


def test_the_reward_service_rides_out_a_redis_restart(tmp_path):
    with RestartableRedis(tmp_path / "redis") as server:
        client = redis.Redis.from_url(server.url)
        spec = small_spec(make_model_dir(tmp_path / "m"), make_dataset(tmp_path / "d"), tmp_path)
        store = RunStore(client)
        run_id = store.create(spec).run_id
        store.act(run_id, "start")
        bus = RedisBus(client, run_id)
        stack = Stack(server.url, run_id, tmp_path / "runs" / run_id, threads=1)
        proc = stack.start("reward", extra_env={"DAPO_REDIS_RETRY_MAX_S": "0.5"})
        try:
            stack.wait_ready(timeout_s=120)
            bus.publish("rollouts", rollout_group(run_id, "g0", [[50, 256], [49, 256]]))
            wait_for(lambda: client.xlen(bus.key("scored")) == 1, proc, "first scored group")
            server.kill()
            code, reason = wait_for(
                lambda: "redis outage" in (r := readyz(proc))[1] and r, proc, "outage in /readyz"
            )
            assert code == 503 and "ConnectionError" in reason
            time.sleep(4.0)  # longer than the client library's own retries cover
            assert proc.popen.poll() is None and readyz(proc)[0] == 503
            server.start()
            client = redis.Redis.from_url(server.url)
            bus = RedisBus(client, run_id)
            bus.publish("rollouts", rollout_group(run_id, "g1", [[50, 256], [52, 256]]))
            wait_for(lambda: client.xlen(bus.key("scored")) == 2, proc, "group after the outage")
            wait_for(lambda: readyz(proc)[0] == 200, proc, "ready again")
            time.sleep(1.0)  # nothing scored twice, even once the reclaim has looked
            assert client.xlen(bus.key("scored")) == 2
            assert proc.popen.poll() is None
        finally:
            stack.stop()
    log = proc.log_path.read_text()
    assert log.count("redis unreachable") == 1, log
    assert "redis answers again" in log and "Traceback" not in log
