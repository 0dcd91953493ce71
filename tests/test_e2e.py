"""End to end: the four services as real processes over a real Redis, real weight
broadcast over gloo, a few DAPO steps on a tiny model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import redis
from transformers import AutoModelForCausalLM

from dapo.cli.stack import RestartPolicy
from dapo.transport.redis_bus import RedisBus
from dapo.weights.registry import stale_or_mismatched_workers
from proto.keys import run_key
from tests.e2e_helpers import (
    make_dataset,
    make_model_dir,
    metrics_lines,
    small_spec,
    start_run,
    wait_status,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model"))


def in_flight_on_streams(client: redis.Redis, run_id: str) -> int:
    """Prompts that are somewhere in the pipeline: a prompt task, a rollout group or a scored
    group not yet acknowledged by its consumer (the sampler's held surplus included)."""
    total = 0
    for stream, group in (("prompts", "rollout"), ("rollouts", "reward"), ("scored", "sampler")):
        for g in client.xinfo_groups(run_key(run_id, stream)):
            if g["name"].decode() == group:
                total += int(g["pending"]) + int(g["lag"] or 0)
    return total


def assert_account_adds_up(store, run_id: str) -> None:
    """Every dispatched prompt is trained, filtered, dropped as stale, or still somewhere on
    the streams: the account and the streams agree, nothing lost, nothing counted twice."""
    account = store.account(run_id)
    filtered = account["filtered_all_correct"] + account["filtered_all_wrong"]
    assert account["dispatched"] == (
        account["trained"]
        + filtered
        + account["dropped_stale"]
        + in_flight_on_streams(store.client, run_id)
    )


def test_short_run_trains_broadcasts_and_accounts(model_dir, tmp_path, redis_url):
    spec = small_spec(model_dir, make_dataset(tmp_path / "train.jsonl"), tmp_path / "runs")
    store, stack = start_run(redis_url, spec, rollout_workers=2)
    run_id = stack.run_id
    try:
        assert wait_status(store, stack, run_id, {"completed", "failed"}) == "completed"
        state = store.state(run_id)
        assert state.step == 3 and state.policy_version == 3
        rows = metrics_lines(stack.run_dir)
        assert [r["batch_id"] for r in rows] == [0, 1, 2]
        # every rollout worker reports the learner's final weights, bit for bit (checksums)
        deadline = time.monotonic() + 30
        while (
            bad := stale_or_mismatched_workers(store.client, run_id, 3)
        ) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert bad == {}
    finally:
        stack.stop()
    account = store.account(run_id)
    assert account["batches"] == 3 and account["trained"] == 3 * spec.data.train_batch_size
    assert_account_adds_up(store, run_id)
    final = stack.run_dir / "checkpoints" / "step_000003"
    AutoModelForCausalLM.from_pretrained(str(final))  # plain HF loading works


def test_learner_killed_mid_run_resumes_without_losing_a_batch(model_dir, tmp_path, redis_url):
    spec = small_spec(
        model_dir,
        make_dataset(tmp_path / "train.jsonl"),
        tmp_path / "runs",
        trainer={"total_training_steps": 12, "save_freq": 1, "runs_dir": str(tmp_path / "runs")},
    )
    store, stack = start_run(redis_url, spec, rollout_workers=1)
    run_id = stack.run_id
    try:
        learner = next(p for p in stack.procs if p.kind == "learner")
        ckpts = stack.run_dir / "checkpoints"
        deadline = time.monotonic() + 120
        # older checkpoints are pruned (keep_checkpoints), so wait for any at step >= 2
        while newest_checkpoint_step(ckpts) < 2:
            assert time.monotonic() < deadline, "no checkpoint at step 2"
            time.sleep(0.05)
        os.kill(learner.popen.pid, signal.SIGKILL)  # a crash: no cleanup at all
        assert learner.popen.wait() == -signal.SIGKILL, "the learner ended before the crash"
        assert newest_checkpoint_step(ckpts) < 12
        stack.procs.remove(learner)
        stack.start("learner", 1)
        assert wait_status(store, stack, run_id, {"completed", "failed"}) == "completed"
    finally:
        stack.stop()
    account = store.account(run_id)
    assert account["batches"] == 12  # the sampler published each batch exactly once
    trained = [r["batch_id"] for r in metrics_lines(stack.run_dir)]
    # after the restart the learner continues from its newest checkpoint: every batch id
    # appears, and the ones trained twice are only those the crash rolled back
    assert sorted(set(trained)) == list(range(12))
    last_ckpt = newest_checkpoint_step(stack.run_dir / "checkpoints")
    assert last_ckpt == 12 and store.state(run_id).policy_version == 12


def wait_for_log(path, text: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not (path.is_file() and text in path.read_text()):
        assert time.monotonic() < deadline, f"{path.name} never said {text!r}"
        time.sleep(0.2)


def newest_checkpoint_step(ckpts) -> int:
    """The step of the newest finished checkpoint in ``ckpts``, -1 when there is none."""
    if not ckpts.is_dir():
        return -1
    steps = [int(p.name.split("_")[1]) for p in ckpts.iterdir() if p.name.startswith("step_")]
    return max(steps, default=-1)


def test_a_killed_service_is_restarted_and_the_run_completes(model_dir, tmp_path, redis_url):
    spec = small_spec(
        model_dir,
        make_dataset(tmp_path / "train.jsonl"),
        tmp_path / "runs",
        trainer={"total_training_steps": 4, "save_freq": 2, "runs_dir": str(tmp_path / "runs")},
    )
    store, stack = start_run(redis_url, spec, rollout_workers=1)
    stack.restart = RestartPolicy(backoff_s=0.2)
    run_id = stack.run_id
    try:
        deadline = time.monotonic() + 120
        while store.state(run_id).step < 1:
            assert time.monotonic() < deadline, "no training step"
            stack.check_alive()
            time.sleep(0.2)
        reward = next(p for p in stack.procs if p.kind == "reward")
        os.kill(reward.popen.pid, signal.SIGKILL)  # what an OOM kill looks like
        reward.popen.wait()
        while reward.restarts == 0:  # what `dapo up` does while the run goes on
            assert time.monotonic() < deadline + 60, "the reward service was not restarted"
            stack.supervise(lambda p: store.record_restart(run_id, p.worker_id))
            time.sleep(0.05)
        status = wait_status(store, stack, run_id, {"completed", "failed"}, supervise=True)
        assert status == "completed"
    finally:
        stack.stop()
    assert store.state(run_id).restarts == {"reward-0": 1}
    account = store.account(run_id)
    assert account["batches"] == 4 and account["trained"] == 4 * spec.data.train_batch_size
    assert_account_adds_up(store, run_id)


@pytest.mark.parametrize("staleness", [0, 1, 2])
def test_every_trained_token_respects_the_staleness_bound(
    model_dir, tmp_path, redis_url, staleness
):
    """The bound holds at training time, on the real pipeline: for every trained token,
    (learner version at the step) - (version that generated it) <= max_staleness, and the
    sampler's dispatch keeps violators from ever reaching the learner."""
    runs = tmp_path / "runs"
    spec = small_spec(
        model_dir,
        make_dataset(tmp_path / "train.jsonl"),
        runs,
        algorithm={"max_staleness": staleness},
        trainer={"total_training_steps": 6, "save_freq": 0, "runs_dir": str(runs)},
    )
    store, stack = start_run(redis_url, spec, rollout_workers=2)
    try:
        assert wait_status(store, stack, stack.run_id, {"completed", "failed"}) == "completed"
    finally:
        stack.stop()
    rows = metrics_lines(stack.run_dir)
    assert [r["batch_id"] for r in rows] == list(range(6))
    lags = ("0", "1", "2", "3plus")
    for r in rows:
        assert r["staleness/lag_max"] <= staleness and r["staleness/dropped_samples"] == 0, r
        counts = [r[f"staleness/tokens_lag_{k}"] for k in lags]
        assert sum(counts) > 0 and sum(counts[staleness + 1 :]) == 0
    if staleness:  # and the bound is used: generation overlaps training
        assert max(r["staleness/lag_max"] for r in rows) >= 1
    assert_account_adds_up(store, stack.run_id)


def test_a_second_learner_for_the_run_waits_and_trains_nothing(model_dir, tmp_path, redis_url):
    runs = tmp_path / "runs"
    spec = small_spec(
        model_dir,
        make_dataset(tmp_path / "train.jsonl"),
        runs,
        trainer={"total_training_steps": 4, "save_freq": 2, "runs_dir": str(runs)},
    )
    store, stack = start_run(redis_url, spec, rollout_workers=1)
    # paused, so the run cannot end before the second learner has met the first one's lease
    store.act(stack.run_id, "pause")
    first = next(p for p in stack.procs if p.kind == "learner")
    wait_for_log(first.log_path, "taken")
    second = stack.start("learner", 1)  # a second replica by mistake, under another name
    try:
        wait_for_log(second.log_path, "waiting for it")
        store.act(stack.run_id, "resume")
        assert wait_status(store, stack, stack.run_id, {"completed", "failed"}) == "completed"
        second.popen.wait(timeout=60)  # the run ended while it waited: it leaves
    finally:
        stack.stop()
    assert second.popen.returncode == 0
    assert "waiting for it" in second.log_path.read_text()
    assert [r["batch_id"] for r in metrics_lines(stack.run_dir)] == [0, 1, 2, 3]
    client = redis.Redis.from_url(redis_url)
    announced = [m.version for m in RedisBus(client, stack.run_id).read("versions")[1]]
    assert announced == sorted(set(announced))  # no version announced twice
    assert store.state(stack.run_id).policy_version == 4


def test_dataset_row_without_answer_is_reported_before_anything_starts(model_dir, tmp_path):
    data = make_dataset(tmp_path / "bad.jsonl", bad_row=4)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dapo.cli",
            "up",
            "--skip-eval",
            f"model.path={model_dir}",
            f"data.train_files=[{data}]",
            f"data.val_files=[{data}]",
            f"trainer.runs_dir={tmp_path / 'runs'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, DAPO_REDIS_URL=""),
    )
    assert proc.returncode != 0
    assert "row 4" in proc.stderr or "line 5" in proc.stderr, proc.stderr
    assert "ground_truth" in proc.stderr
    assert not (tmp_path / "runs").exists()  # no run was created


def test_ctrl_c_stops_the_run_gracefully_and_every_process(model_dir, tmp_path):
    data = make_dataset(tmp_path / "train.jsonl")
    runs = tmp_path / "runs"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dapo.cli",
            "up",
            "--skip-eval",
            f"model.path={model_dir}",
            f"data.train_files=[{data}]",
            f"data.val_files=[{data}]",
            "data.train_batch_size=2",
            "data.max_response_length=8",
            "rollout.n=4",
            "actor.ppo_mini_batch_size=2",
            "reward.overlong_buffer.len=6",
            "algorithm.filter_groups.metric=score",
            "trainer.total_training_steps=100000",
            "trainer.save_freq=0",
            f"trainer.runs_dir={runs}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, DAPO_REDIS_URL=""),
    )
    try:
        deadline = time.monotonic() + 180
        while (
            not list(runs.glob("*/metrics.jsonl"))
            or len(next(runs.glob("*/metrics.jsonl")).read_text().splitlines()) < 2
        ):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.3)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C does
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out[-3000:]
    (run_dir,) = list(runs.iterdir())
    assert list((run_dir / "checkpoints").glob("step_*/model.safetensors"))  # final checkpoint
    # every service the launcher listed as healthy is gone
    pids = [int(line.split()[1]) for line in out.splitlines() if line.endswith(" healthy")]
    assert len(pids) == 5
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_over_long_prompt_is_reported_before_anything_starts(model_dir, tmp_path):
    data = make_dataset(tmp_path / "d.jsonl")  # prompts "0+1=" .. "11+1=": 4-5 tokens
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dapo.cli",
            "up",
            "--skip-eval",
            f"model.path={model_dir}",
            f"data.train_files=[{data}]",
            f"data.val_files=[{data}]",
            "data.max_prompt_length=4",
            f"trainer.runs_dir={tmp_path / 'runs'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, DAPO_REDIS_URL=""),
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "row 10: prompt is 5 tokens, over data.max_prompt_length (4)" in proc.stderr
    assert not (tmp_path / "runs").exists()
