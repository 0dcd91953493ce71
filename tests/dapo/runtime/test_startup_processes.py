"""Real service processes that cannot start for their run: each exits non-zero, the run is
``failed`` with the reason, and ``dapo status`` shows both."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from dapo.cli.stack import Stack
from dapo.runtime.runs import RunStore
from services.api.app import create_app
from services.api.settings import ApiSettings
from tests.e2e_helpers import make_dataset, make_model_dir, small_spec
from tests.servers import serve_in_thread

TOKEN = "startup-test-token-6d1f"


def started_run(redis_url: str, spec) -> tuple[RunStore, str]:
    store = RunStore(redis.Redis.from_url(redis_url))
    run_id = store.create(spec).run_id
    store.act(run_id, "start")
    return store, run_id


def run_service(redis_url: str, run_id: str, kind: str, run_dir: Path) -> str:
    """Starts one service process for the run; waits for it to exit non-zero; its log."""
    proc = Stack(redis_url, run_id, run_dir, threads=1).start(kind)
    code = proc.popen.wait(timeout=180)
    log = proc.log_path.read_text()
    assert code != 0, log
    return log


def dapo_status(url: str, run_id: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "dapo.cli", "status", run_id, "--api", url],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, DAPO_API_TOKEN=TOKEN),
        check=True,
    )
    return json.loads(out.stdout)


@pytest.mark.parametrize("kind", ["learner", "rollout", "reward"])
def test_a_service_without_its_model_fails_the_run(kind, redis_url, tmp_path):
    data = make_dataset(tmp_path / "d.jsonl")
    spec = small_spec(tmp_path / "no-such-model", data, tmp_path / "runs")
    store, run_id = started_run(redis_url, spec)
    log = run_service(redis_url, run_id, kind, tmp_path / "runs" / run_id)
    state = store.state(run_id)
    assert state.status == "failed", log
    assert state.error.startswith(f"{kind} {kind}-0 could not start: FileNotFoundError")
    assert "no-such-model" in state.error
    assert state.startup_failures[kind].count == 1


def test_a_dataset_error_in_the_sampler_fails_the_run_and_status_says_why(redis_url, tmp_path):
    model = make_model_dir(tmp_path / "model")
    data = make_dataset(tmp_path / "bad.jsonl", bad_row=4)
    store, run_id = started_run(redis_url, small_spec(model, data, tmp_path / "runs"))
    run_service(redis_url, run_id, "sampler", tmp_path / "runs" / run_id)
    app = create_app(ApiSettings(redis_url=redis_url, token=TOKEN), redis.Redis.from_url(redis_url))
    with serve_in_thread(app) as url:
        shown = dapo_status(url, run_id)
    assert shown["status"] == "failed"
    assert shown["error"].startswith("sampler sampler-0 could not start: DatasetError")
    assert "ground_truth" in shown["error"] and (
        "row 4" in shown["error"] or "line 5" in shown["error"]
    )
    assert store.state(run_id).status == "failed"
