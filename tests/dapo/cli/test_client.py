"""``DapoClient`` and the ``dapo run/runs/status/stop/pause/resume`` commands against a
real API server (uvicorn on a free port) over a real private Redis (database 12)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis

from dapo.cli.client import ApiError, DapoClient
from dapo.cli.client_cli import add_client_commands
from dapo.runtime.config import load_run_spec
from dapo.runtime.runs import RunStore, register_service
from services.api.app import create_app
from services.api.settings import ApiSettings
from tests.servers import serve_in_thread

TOKEN = "client-test-token-91c2"


@pytest.fixture(scope="module")
def rclient(redis_server) -> redis.Redis:
    return redis.Redis.from_url(redis_server.rsplit("/", 1)[0] + "/12")


@pytest.fixture(scope="module")
def base_url(redis_server, rclient):
    settings = ApiSettings(redis_url=redis_server.rsplit("/", 1)[0] + "/12", token=TOKEN)
    with serve_in_thread(create_app(settings, rclient)) as url:
        yield url


@pytest.fixture
def store(rclient) -> RunStore:
    """The run store, with no run left active by an earlier test."""
    s = RunStore(rclient)
    for state in s.active():
        s.set_status(state.run_id, "stopped")
    return s


@pytest.fixture
def api(base_url):
    with DapoClient(base_url, token=TOKEN) as c:
        yield c


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "name: clitest\n"
        "data: {train_batch_size: 4}\n"
        "actor: {ppo_mini_batch_size: 2}\n"
        f"trainer: {{runs_dir: {tmp_path}}}\n"
    )
    return path


def test_client_lifecycle_calls(api, store, config_file):
    state = api.start_run(config_file)
    run_id = state["run_id"]
    assert state["status"] == "running" and run_id.startswith("clitest-")
    assert store.spec(run_id).data.train_batch_size == 4
    assert run_id in [r["run_id"] for r in api.list_runs()]
    detail = api.status(run_id)
    assert detail["status"] == "running" and detail["account"]["dispatched"] == 0
    assert api.pause(run_id)["status"] == "paused"
    assert api.resume(run_id)["status"] == "running"
    register_service(store.client, "learner", "learner-0", {"run_id": run_id})  # one is alive
    assert api.stop(run_id)["status"] == "stopping"
    with pytest.raises(ApiError) as err:
        api.resume(run_id)
    assert err.value.status_code == 409 and "is stopping" in str(err.value)


def test_client_accepts_spec_objects_and_mappings(api, store, config_file):
    spec = load_run_spec(config_file, ["name=fromobject"])
    first = api.start_run(spec)
    assert store.spec(first["run_id"]).name == "fromobject"
    with pytest.raises(ApiError) as err:  # one active run at a time
        api.start_run({"name": "second"})
    assert err.value.status_code == 409 and first["run_id"] in err.value.detail
    store.set_status(first["run_id"], "completed")
    assert api.start_run({"name": "frommapping"})["run_id"].startswith("frommapping-")


def test_client_errors_carry_status_and_detail(base_url, api, store):
    with pytest.raises(ApiError) as err:
        api.start_run({"rollout": {"n": 1}})
    assert err.value.status_code == 422
    assert err.value.detail[0]["loc"] == ["body", "rollout", "n"]
    assert "rollout.n" in str(err.value)
    with pytest.raises(ApiError) as err:
        api.status("missing-run")
    assert err.value.status_code == 404
    with DapoClient(base_url, token="wrong") as bad, pytest.raises(ApiError) as err:
        bad.list_runs()
    assert err.value.status_code == 401
    with DapoClient("http://127.0.0.1:9", timeout=2) as nowhere, pytest.raises(ApiError) as err:
        nowhere.list_runs()
    assert err.value.status_code == 0 and "cannot reach" in str(err.value)


def test_wait_returns_on_a_final_status_and_times_out(api, store):
    run_id = api.start_run({"name": "waited"})["run_id"]
    with pytest.raises(TimeoutError, match="still running"):
        api.wait(run_id, timeout_s=0.3, poll_s=0.1)
    finisher = threading.Timer(0.3, store.set_status, args=(run_id, "completed"))
    finisher.start()
    t0 = time.monotonic()
    final = api.wait(run_id, timeout_s=10, poll_s=0.05)
    finisher.join()
    assert final["status"] == "completed" and time.monotonic() - t0 < 5


def _dapo(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dapo")
    add_client_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_commands(base_url, store, config_file, capsys, monkeypatch):
    monkeypatch.setenv("DAPO_API_URL", base_url)
    monkeypatch.setenv("DAPO_API_TOKEN", TOKEN)
    assert _dapo(["run", "--config", str(config_file), "rollout.n=4"]) == 0
    run_id, status = capsys.readouterr().out.split()[:2]
    assert status == "running" and store.spec(run_id).rollout.n == 4

    assert _dapo(["runs"]) == 0
    table = capsys.readouterr().out
    assert table.startswith("RUN ID") and run_id in table
    assert _dapo(["runs", "--json"]) == 0
    assert run_id in [r["run_id"] for r in json.loads(capsys.readouterr().out)]
    assert _dapo(["status", run_id]) == 0
    assert json.loads(capsys.readouterr().out)["account"]["in_flight"] == 0
    register_service(store.client, "learner", "learner-0", {"run_id": run_id})  # one is alive
    for command, expected in [("pause", "paused"), ("resume", "running"), ("stop", "stopping")]:
        assert _dapo([command, run_id]) == 0
        assert capsys.readouterr().out.split()[:2] == [run_id, expected]

    assert _dapo(["pause", run_id]) == 1
    assert "409" in capsys.readouterr().err
    assert _dapo(["status", "nope", "--api", base_url, "--token", "bad"]) == 1
    assert "401" in capsys.readouterr().err


def test_cli_run_validates_locally_first(store, config_file, capsys, monkeypatch):
    monkeypatch.setenv("DAPO_API_URL", "http://127.0.0.1:9")  # never contacted
    before = len(store.list())
    assert _dapo(["run", "-c", str(config_file), "actor.clip_ratio_low=1.5"]) == 2
    assert "actor.clip_ratio_low" in capsys.readouterr().err
    assert len(store.list()) == before


def test_cli_module_imports_nothing_heavy():
    code = (
        "import argparse, sys\n"
        "from dapo.cli.client_cli import add_client_commands\n"
        "add_client_commands(argparse.ArgumentParser().add_subparsers())\n"
        "print(sorted(m for m in ('httpx', 'fastapi', 'redis', 'pydantic', 'yaml', "
        "'proto.runspec') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=str(Path(__file__).parents[3]),
    )
    assert out.stdout.strip() == "[]"
