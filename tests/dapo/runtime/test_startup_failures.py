"""Failed start-ups reach the run's state: an error of the run's own inputs fails the run at
once with its reason, other errors after ``startup_failure_limit`` start-ups in a row of
one kind, and a start-up that reaches its loop clears the count."""

from __future__ import annotations

import pytest
import redis

from dapo.data.dataset import DatasetError
from dapo.runtime.config import ConfigError, ServiceSettings
from dapo.runtime.runs import MemoryRunStore, RunStore
from dapo.runtime.service import ServiceRuntime
from proto.keys import RunKeys
from proto.runspec import RunSpec


@pytest.fixture(params=["redis", "memory"])
def store(request, redis_server):
    if request.param == "memory":
        return MemoryRunStore()
    return RunStore(redis.Redis.from_url(redis_server))


def test_the_limit_th_failure_in_a_row_fails_the_run(store):
    rid = store.create(RunSpec(name="sf")).run_id
    store.act(rid, "start")
    first = store.record_startup_failure(rid, "learner", "learner-0 could not start: OOM", 3)
    assert first.status == "running"
    assert first.startup_failures["learner"].count == 1
    store.record_startup_failure(rid, "rollout", "rollout-1 could not start: busy", 3)
    store.clear_startup_failures(rid, "rollout")  # a rollout worker reached its loop
    store.record_startup_failure(rid, "learner", "learner-0 could not start: OOM", 3)
    third = store.record_startup_failure(rid, "learner", "learner-0 could not start: OOM!", 3)
    assert third.status == "failed"
    assert third.error == "learner-0 could not start: OOM! (3 start-ups in a row)"
    assert set(third.startup_failures) == {"learner"}
    # an ended run keeps its ending and its record
    assert store.record_startup_failure(rid, "reward", "late", 1).status == "failed"
    assert "reward" not in store.state(rid).startup_failures


def test_a_start_that_reaches_its_loop_resets_the_count(store):
    rid = store.create(RunSpec(name="sf")).run_id
    for _ in range(2):
        store.record_startup_failure(rid, "sampler", "sampler-0 could not start: x", 3)
    store.clear_startup_failures(rid, "sampler")
    for _ in range(2):
        state = store.record_startup_failure(rid, "sampler", "sampler-0 could not start: x", 3)
    assert (state.status, state.startup_failures["sampler"].count) == ("pending", 2)
    assert store.record_startup_failure(rid, "sampler", "now", 1).error == "now"


def new_run(url: str) -> str:
    store = RunStore(redis.Redis.from_url(url))
    rid = store.create(RunSpec(name="sf")).run_id
    store.act(rid, "start")
    return rid


def settings(url: str, rid: str, **more) -> ServiceSettings:
    return ServiceSettings(redis_url=url, run_id=rid, worker_id="w-0", **more)


@pytest.mark.parametrize(
    "error", [ConfigError("trainer.logger: wandb needs the package"), DatasetError("row 4")]
)
def test_an_error_no_restart_can_fix_fails_the_run_at_once(redis_server, error):
    rid = new_run(redis_server)
    with pytest.raises(type(error)), ServiceRuntime("sampler", settings(redis_server, rid)):
        raise error
    state = RunStore(redis.Redis.from_url(redis_server)).state(rid)
    assert state.status == "failed"
    assert state.error == f"sampler w-0 could not start: {type(error).__name__}: {error}"


def test_other_errors_fail_the_run_after_the_limit(redis_server):
    rid = new_run(redis_server)
    store = RunStore(redis.Redis.from_url(redis_server))
    for attempt in (1, 2):
        with (
            pytest.raises(RuntimeError),
            ServiceRuntime("rollout", settings(redis_server, rid, startup_failure_limit=2)),
        ):
            raise RuntimeError(f"CUDA out of memory ({attempt})")
        assert store.state(rid).startup_failures["rollout"].count == attempt
    state = store.state(rid)
    assert state.status == "failed" and "CUDA out of memory (2)" in state.error


def test_errors_once_the_loop_runs_are_no_start_up_failure(redis_server):
    rid = new_run(redis_server)
    store = RunStore(redis.Redis.from_url(redis_server))
    store.record_startup_failure(rid, "reward", "reward w-0 could not start: earlier", 3)
    with pytest.raises(DatasetError), ServiceRuntime("reward", settings(redis_server, rid)) as rt:

        def loop() -> None:
            assert store.state(rid).startup_failures == {}  # started: the count is cleared
            raise DatasetError("raised by the loop")

        rt.serve(loop)
    assert store.state(rid).status == "running"


def test_a_spec_the_service_cannot_read_fails_the_run(redis_server):
    rid = new_run(redis_server)
    client = redis.Redis.from_url(redis_server)
    client.set(RunKeys(rid).spec, '{"actor": {"clip_ratio_low": 3}}')  # written by a newer API
    with pytest.raises(ValueError), ServiceRuntime("learner", settings(redis_server, rid)):
        pass
    state = RunStore(client).state(rid)
    assert state.status == "failed"
    assert state.error.startswith("learner w-0 could not start: ValidationError")
    assert "clip_ratio_low" in state.error


@pytest.mark.parametrize(
    ("field", "value"),
    [("redis_outage_max_s", 0), ("redis_retry_max_s", -1), ("startup_failure_limit", 0)],
)
def test_resilience_settings_are_validated_by_name(monkeypatch, field, value):
    monkeypatch.setenv(f"DAPO_{field.upper()}", str(value))
    with pytest.raises(ConfigError, match=field):
        ServiceSettings.from_env()
