"""The whole stack rides out Redis killed mid-run and started again on its append-only
file: no service dies, every one answers /readyz 503 meanwhile, and the run completes with
every batch trained exactly once. An outage longer than the learner's lease costs the
learner a restart, nothing more."""

from __future__ import annotations

import time

import pytest

from services.learner.main import LEASE_TTL_S
from tests.e2e_helpers import make_dataset, make_model_dir, metrics_lines, small_spec, start_run
from tests.e2e_helpers import wait_status as wait_run
from tests.restartable_redis import RestartableRedis


@pytest.mark.slow
def test_every_service_rides_out_a_redis_restart_mid_run(tmp_path):
    spec = small_spec(
        make_model_dir(tmp_path / "model"),
        make_dataset(tmp_path / "d.jsonl"),
        tmp_path / "runs",
        trainer={"total_training_steps": 6, "save_freq": 2, "runs_dir": str(tmp_path / "runs")},
    )
    with RestartableRedis(tmp_path / "redis") as server:
        env = {"DAPO_REDIS_RETRY_MAX_S": "0.5"}
        store, stack = start_run(server.url, spec, rollout_workers=1, env=env)
        run_id = stack.run_id
        try:
            deadline = time.monotonic() + 300
            while store.state(run_id).step < 1:
                stack.check_alive()
                assert time.monotonic() < deadline, "no step trained"
                time.sleep(0.2)
            server.kill()
            deadline = time.monotonic() + 60
            while any(p.healthy() for p in stack.procs):
                assert time.monotonic() < deadline, "a service stayed ready without Redis"
                time.sleep(0.1)
            time.sleep(4.0)  # longer than the client library's own retries cover
            stack.check_alive()
            server.start()
            status = wait_run(store, stack, run_id, {"completed", "failed"}, timeout_s=600)
            stack.check_alive()  # nobody died, nobody was restarted
            logs = {p.worker_id: p.log_path.read_text() for p in stack.procs}
            state, account = store.state(run_id), store.account(run_id)
        finally:
            stack.stop()
    assert status == "completed", state.error
    assert (state.step, state.policy_version) == (6, 6)  # six batches, each trained once
    assert account["trained"] == 6 * spec.data.train_batch_size
    logged = [r["batch_id"] for r in metrics_lines(stack.run_dir)]
    # a step whose figures were being recorded when Redis went away keeps its training but
    # may miss its line of figures: never a line twice, never a batch out of order
    assert logged == sorted(set(logged)) and set(logged) <= set(range(6)) and len(logged) >= 5
    outages = {w: log.count("redis unreachable") for w, log in logs.items()}
    assert all(n <= 1 for n in outages.values()), outages  # logged once, if it was met
    assert sum(outages.values()) >= 1 and not any("Traceback" in log for log in logs.values())


@pytest.mark.slow
def test_an_outage_longer_than_the_learner_lease_costs_the_learner_a_restart(tmp_path):
    spec = small_spec(
        make_model_dir(tmp_path / "model"),
        make_dataset(tmp_path / "d.jsonl"),
        tmp_path / "runs",
        trainer={"total_training_steps": 4, "save_freq": 2, "runs_dir": str(tmp_path / "runs")},
    )
    with RestartableRedis(tmp_path / "redis") as server:
        env = {"DAPO_REDIS_RETRY_MAX_S": "0.5"}
        store, stack = start_run(server.url, spec, rollout_workers=1, env=env)
        run_id = stack.run_id
        try:
            deadline = time.monotonic() + 300
            while store.state(run_id).step < 1:
                stack.check_alive()
                assert time.monotonic() < deadline, "no step trained"
                time.sleep(0.2)
            server.kill()
            time.sleep(LEASE_TTL_S + 3.0)  # the lease lapses while Redis is away
            stack.check_alive()  # everyone still waits
            server.start()
            status = wait_run(store, stack, run_id, {"completed", "failed"}, 180, supervise=True)
            state = store.state(run_id)
            learner_log = next(p for p in stack.procs if p.kind == "learner").log_path.read_text()
        finally:
            stack.stop()
    assert status == "completed", state.error
    # the learner, fenced out, exited and was restarted once; nobody else was restarted
    assert state.restarts == {"learner-0": 1}, state.restarts
    assert "FencedOut" in learner_log
    assert (state.step, state.policy_version) == (4, 4)
