"""The whole lifecycle through the control API with the real services running: start a run,
see it progress, pause, resume, stop gracefully, find the final checkpoint."""

from __future__ import annotations

import time
from pathlib import Path

import redis

from dapo.cli.client import DapoClient
from dapo.cli.stack import Stack
from services.api.app import create_app
from services.api.settings import ApiSettings
from tests.e2e_helpers import make_dataset, make_model_dir, small_spec
from tests.servers import serve_in_thread


def wait_for(predicate, timeout_s: float, what: str, stack: Stack):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stack.check_alive()
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_start_progress_pause_resume_stop(tmp_path, redis_server):
    # a database of its own: "one active run at a time" must not see other tests' runs
    redis_url = redis_server.rsplit("/", 1)[0] + "/13"
    spec = small_spec(
        make_model_dir(tmp_path / "model"),
        make_dataset(tmp_path / "d.jsonl"),
        tmp_path / "runs",
        trainer={"total_training_steps": 1000, "save_freq": 0, "runs_dir": str(tmp_path / "runs")},
    )
    settings = ApiSettings(redis_url=redis_url, port=0, token="lifecycle-test-token-5e2d")
    app = create_app(settings, redis.Redis.from_url(redis_url))
    with serve_in_thread(app) as url:
        api = DapoClient(url, token="lifecycle-test-token-5e2d")
        run_id = api.start_run(spec.model_dump(mode="json"))["run_id"]
        # services started without a run id follow the active run, as in a cluster
        stack = Stack(redis_url, "", Path(spec.trainer.runs_dir) / run_id, threads=1)
        try:
            for kind in ("sampler", "reward", "rollout", "learner"):
                stack.start(kind)
            stack.wait_ready(timeout_s=120)
            wait_for(lambda: api.status(run_id)["step"] >= 2, 120, "progress", stack)
            detail = api.status(run_id)
            assert detail["latest_metrics"]["step"] >= 1 and detail["account"]["dispatched"] > 0

            assert api.pause(run_id)["status"] == "paused"
            time.sleep(1.5)  # let the step in flight finish
            frozen = api.status(run_id)["step"]
            time.sleep(2.0)
            assert api.status(run_id)["step"] == frozen, "trained while paused"

            assert api.resume(run_id)["status"] == "running"
            wait_for(lambda: api.status(run_id)["step"] > frozen, 60, "resume", stack)

            api.stop(run_id)
            wait_for(lambda: api.status(run_id)["status"] == "stopped", 60, "stop", stack)
            final = api.status(run_id)["final_checkpoint"]
            assert final and (Path(final) / "model.safetensors").is_file()
        finally:
            stack.stop()
