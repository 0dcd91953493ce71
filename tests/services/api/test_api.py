"""The control API over HTTP: a real uvicorn server on a free port, a real private Redis.

The API's own Redis database (index 11 of the session's private server) keeps
its run index and service registry apart from other tests'. Runs left active
by one test are finished by the ``idle`` fixture, as the learner would.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis
import schemathesis
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from dapo.runtime.config import ConfigError
from dapo.runtime.runs import RunStore, register_service
from dapo.transport.redis_embed import free_port
from proto.keys import SERVICES_PREFIX, RunKeys
from proto.state import StepReport
from services.api.app import create_app
from services.api.settings import ApiSettings
from tests.servers import serve_in_thread

TOKEN = "api-test-token-7f3a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
OPEN = {"/healthz", "/readyz", "/metrics"}


@pytest.fixture(scope="module")
def db_url(redis_server) -> str:
    return redis_server.rsplit("/", 1)[0] + "/11"


@pytest.fixture(scope="module")
def rclient(db_url) -> redis.Redis:
    return redis.Redis.from_url(db_url)


@pytest.fixture(scope="module")
def app(db_url, rclient):
    return create_app(ApiSettings(redis_url=db_url, token=TOKEN), rclient)


@pytest.fixture(scope="module")
def base_url(app):
    with serve_in_thread(app) as url:
        yield url


@pytest.fixture
def http(base_url):
    with httpx.Client(base_url=base_url, headers=AUTH, timeout=10) as c:
        yield c


@pytest.fixture
def idle(rclient):
    """No active run in the API's database."""
    store = RunStore(rclient)
    for state in store.active():
        store.set_status(state.run_id, "stopped")
    return store


def small_spec(tmp_path, name: str = "apitest") -> dict:
    return {
        "name": name,
        "data": {"train_batch_size": 4},
        "actor": {"ppo_mini_batch_size": 2},
        "trainer": {"runs_dir": str(tmp_path)},
    }


def start(http, tmp_path, name: str = "apitest") -> dict:
    resp = http.post("/v1/runs", json=small_spec(tmp_path, name))
    assert resp.status_code == 201, resp.text
    return resp.json()


def test_every_protected_route_needs_the_token(app, base_url):
    routes = [(m, r.path) for r in app.routes if isinstance(r, APIRoute) for m in r.methods]
    protected = [(m, p.replace("{run_id}", "some-run")) for m, p in routes if p not in OPEN]
    protected.append(("GET", "/openapi.json"))
    assert len(protected) >= 7  # create, list, get, stop, pause, resume, schema
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        for method, path in protected:
            resp = httpx.request(method, base_url + path, headers=headers, json={})
            assert resp.status_code == 401, (method, path, headers, resp.text)
            assert resp.headers["www-authenticate"] == "Bearer"


def test_probes_are_open_and_readyz_follows_the_registry(base_url, rclient):
    for key in rclient.scan_iter(match=f"{SERVICES_PREFIX}*"):
        rclient.delete(key)
    assert httpx.get(base_url + "/healthz").json() == {"status": "alive"}
    resp = httpx.get(base_url + "/readyz")
    assert resp.status_code == 503 and "no service" in resp.json()["reason"]
    register_service(rclient, "learner", "learner-test-1", {"health_port": 1})
    try:
        resp = httpx.get(base_url + "/readyz")
        assert resp.status_code == 200 and resp.json()["services"] == ["learner"]
    finally:
        rclient.delete(f"{SERVICES_PREFIX}learner:learner-test-1")
    assert httpx.get(base_url + "/metrics").status_code == 200


def test_start_run_returns_running_state(http, idle, tmp_path):
    state = start(http, tmp_path)
    assert state["status"] == "running" and state["run_id"].startswith("apitest-")
    assert idle.state(state["run_id"]).status == "running"
    stored = idle.spec(state["run_id"])
    assert stored.trainer.runs_dir == str(tmp_path) and stored.data.train_batch_size == 4
    listed = http.get("/v1/runs").json()
    assert state["run_id"] in [r["run_id"] for r in listed]


@pytest.mark.parametrize(
    ("body", "loc", "words"),
    [
        ({"actor": {"clip_ratio_low": 2}}, ["body", "actor", "clip_ratio_low"], "less than 1"),
        ({"actor": {"clip_ratio_hgh": 0.3}}, ["body", "actor", "clip_ratio_hgh"], "not permitted"),
        ({"rollout": {"n": "many"}}, ["body", "rollout", "n"], "valid integer"),
        ({"data": {"train_batch_size": 3}}, ["body"], "ppo_mini_batch_size must divide"),
    ],
)
def test_bad_spec_is_422_naming_the_field(http, idle, body, loc, words):
    resp = http.post("/v1/runs", json=body)
    assert resp.status_code == 422
    errors = resp.json()["detail"]
    assert [e["loc"] for e in errors] == [loc]
    assert words in errors[0]["msg"]
    dotted = ".".join(loc[1:])
    assert dotted in resp.json()["message"]
    assert idle.active() == []  # nothing was created


def test_second_run_conflicts_until_the_first_ends(http, idle, tmp_path):
    first = start(http, tmp_path)
    resp = http.post("/v1/runs", json=small_spec(tmp_path))
    assert resp.status_code == 409 and first["run_id"] in resp.json()["detail"]
    idle.set_status(first["run_id"], "completed")  # what the learner does at the end
    start(http, tmp_path)


def test_concurrent_runs_allowed_by_setting(db_url, rclient, idle, tmp_path):
    settings_ = ApiSettings(redis_url=db_url, token=TOKEN, allow_concurrent_runs=True)
    with serve_in_thread(create_app(settings_, rclient)) as url:
        with httpx.Client(base_url=url, headers=AUTH) as c:
            ids = {start(c, tmp_path)["run_id"] for _ in range(2)}
    assert ids <= {s.run_id for s in idle.active()} and len(ids) == 2


def test_status_reports_metrics_account_and_checkpoint_from_redis_alone(http, idle, tmp_path):
    run_id = start(http, tmp_path)["run_id"]
    detail = http.get(f"/v1/runs/{run_id}").json()
    assert detail["latest_metrics"] is None and detail["final_checkpoint"] is None
    assert detail["account"]["dispatched"] == 0 and detail["account"]["in_flight"] == 0

    # what the learner and the sampler write; the API reads no file (its pod mounts none)
    figures = {"step": 2.0, "loss": 0.25, "entropy": math.nan}
    idle.report_step(run_id, StepReport(step=2, batch_id=1, version=2, figures=figures))
    idle.client.hset(
        RunKeys(run_id).account,
        mapping={
            "dispatched": 40,
            "trained": 8,
            "filtered_all_correct": 5,
            "filtered_all_wrong": 3,
            "dropped_stale": 2,
            "batches": 2,
        },
    )
    idle.update(run_id, step=2, policy_version=2)
    idle.finish(run_id, "completed", final_checkpoint="/ckpt/step-2")

    detail = http.get(f"/v1/runs/{run_id}").json()
    assert detail["latest_metrics"] == {"step": 2.0, "loss": 0.25, "entropy": None}
    assert detail["step"] == 2 and detail["policy_version"] == 2
    assert detail["account"]["trained"] == 8
    assert detail["account"]["in_flight"] == 40 - (8 + 5 + 3) - 2
    assert detail["final_checkpoint"] == "/ckpt/step-2" and detail["status"] == "completed"
    assert not (tmp_path / run_id).exists()


def test_transitions_and_their_conflicts(http, idle, tmp_path):
    run_id = start(http, tmp_path)["run_id"]

    def act(action: str, code: int = 200) -> dict:
        resp = http.post(f"/v1/runs/{run_id}/{action}")
        assert resp.status_code == code, (action, resp.text)
        return resp.json()

    assert act("resume")["status"] == "running"  # already running: no-op
    assert act("pause")["status"] == "paused"
    assert act("pause")["status"] == "paused"
    assert act("resume")["status"] == "running"
    register_service(idle.client, "learner", "learner-0", {"run_id": run_id})  # one is alive
    assert act("stop")["status"] == "stopping"  # it drains and writes a final checkpoint
    assert "is stopping" in act("pause", 409)["detail"]
    assert "cannot resume it" in act("resume", 409)["detail"]
    assert idle.state(run_id).status == "stopping"
    idle.set_status(run_id, "stopped")  # the learner drained and checkpointed
    for action in ("stop", "pause", "resume"):
        assert "is stopped" in act(action, 409)["detail"]


def test_stop_finishes_a_run_whose_learner_never_started(http, idle, tmp_path):
    run_id = start(http, tmp_path)["run_id"]  # no service of it is alive
    stopped = http.post(f"/v1/runs/{run_id}/stop").json()
    assert stopped["status"] == "stopped" and "no learner" in stopped["error"]
    assert idle.active() == []  # a new run can start at once
    assert http.post("/v1/runs", json=small_spec(tmp_path)).status_code == 201


def race_stops_with_completion(http, store: RunStore, run_id: str) -> list[int]:
    codes: list[int] = []

    def stop() -> None:
        codes.append(http.post(f"/v1/runs/{run_id}/stop").status_code)

    threads = [threading.Thread(target=stop) for _ in range(8)]
    for t in threads[:4]:
        t.start()
    store.set_status(run_id, "completed")  # the learner finishing meanwhile
    for t in threads[4:]:
        t.start()
    for t in threads:
        t.join()
    return codes


def test_stop_never_overwrites_a_final_status(http, idle, tmp_path):
    """Stops racing the learner's completion: whatever the order, completed wins."""
    for _ in range(3):
        run_id = start(http, tmp_path)["run_id"]
        codes = race_stops_with_completion(http, idle, run_id)
        assert set(codes) <= {200, 409} and len(codes) == 8
        assert idle.state(run_id).status == "completed"


def test_unknown_run_is_404(http):
    for method, path in [("GET", ""), ("POST", "/stop"), ("POST", "/pause"), ("POST", "/resume")]:
        resp = http.request(method, f"/v1/runs/no-such-run{path}")
        assert resp.status_code == 404 and "no-such-run" in resp.json()["detail"]


def test_metrics_count_routes_and_active_runs(http, base_url, idle, tmp_path):
    start(http, tmp_path)
    http.get("/v1/runs")
    text = httpx.get(base_url + "/metrics").text
    assert 'dapo_api_requests_total{method="GET",route="/v1/runs",status="200"}' in text
    assert 'dapo_api_request_seconds_bucket{le="0.001",method="POST",route="/v1/runs"}' in text
    assert "dapo_api_active_runs 1.0" in text
    assert "no-such-run" not in text  # ids never become labels


def test_token_file_and_auth_settings(db_url, rclient, tmp_path):
    secret = tmp_path / "token"
    secret.write_text("from-a-file-4c1e9\n")
    app = create_app(ApiSettings(redis_url=db_url, token_file=secret), rclient)
    with serve_in_thread(app) as url:
        ok = httpx.get(url + "/v1/runs", headers={"Authorization": "Bearer from-a-file-4c1e9"})
        assert ok.status_code == 200
        assert httpx.get(url + "/v1/runs").status_code == 401
    with pytest.raises(ConfigError, match="DAPO_AUTH_DISABLED"):
        ApiSettings.from_env(redis_url=db_url)
    with pytest.raises(ConfigError, match="only one"):
        ApiSettings.from_env(token=TOKEN, token_file=secret)
    open_app = create_app(ApiSettings(redis_url=db_url, auth_disabled=True), rclient)
    with serve_in_thread(open_app) as url:
        assert httpx.get(url + "/v1/runs").status_code == 200


def test_short_tokens_are_refused_naming_the_setting(db_url, rclient, tmp_path):
    # 15 characters, the longest refused; surrounding spaces do not count
    with pytest.raises(ConfigError, match="DAPO_API_TOKEN.*at least 16"):
        ApiSettings.from_env(redis_url=db_url, token="  abcdefghijklmno  ")
    ApiSettings.from_env(redis_url=db_url, token="abcdefghijklmnop")  # 16: accepted
    secret = tmp_path / "token"
    secret.write_text("short\n")
    with pytest.raises(ConfigError, match="DAPO_API_TOKEN_FILE.*at least 16"):
        create_app(ApiSettings(redis_url=db_url, token_file=secret), rclient)


def test_autostart_starts_once(db_url, rclient, idle, tmp_path):
    config = tmp_path / "auto.yaml"
    config.write_text(json.dumps(small_spec(tmp_path, "autostarted")))  # JSON is YAML
    settings_ = ApiSettings(redis_url=db_url, token=TOKEN, autostart_config=config)
    for _ in range(2):  # a restarted API must not start a second run
        with serve_in_thread(create_app(settings_, rclient)):
            pass
    started = [s for s in idle.list() if s.run_id.startswith("autostarted-")]
    assert len(started) == 1 and started[0].status == "running"
    config.write_text("actor: {clip_ratio_low: 3}\n")
    with pytest.raises(ConfigError, match="actor.clip_ratio_low"):  # fails before serving
        create_app(settings_, rclient)


def _entry_point(env: dict[str, str]) -> subprocess.Popen:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DAPO_")}
    return subprocess.Popen(
        [sys.executable, "-m", "services.api.main"],
        env={**clean, **env},
        cwd=Path(__file__).parents[3],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_entry_point_serves_and_refuses_without_a_token(db_url, tmp_path):
    refused = _entry_point({"DAPO_REDIS_URL": db_url})
    assert refused.wait(timeout=60) == 2
    assert "DAPO_API_TOKEN" in refused.stderr.read()

    (tmp_path / "token").write_text(TOKEN)
    port = free_port()
    env = {
        "DAPO_REDIS_URL": db_url,
        "DAPO_PORT": str(port),
        "DAPO_API_TOKEN_FILE": str(tmp_path / "token"),
    }
    proc = _entry_point(env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                resp = httpx.get(f"http://127.0.0.1:{port}/v1/runs", headers=AUTH)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.1)
        assert resp.status_code == 200 and isinstance(resp.json(), list)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_fuzz_openapi_no_server_error(base_url, idle, rclient):
    """Schema-driven requests, valid and invalid, over HTTP: never a 5xx (a service
    is registered, so /readyz's designed 503 is not what we are hunting)."""
    register_service(rclient, "sampler", "sampler-fuzz", {}, ttl_s=60)
    schema = schemathesis.openapi.from_url(base_url + "/openapi.json", headers=AUTH)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9
    cases = st.one_of(
        [op.as_strategy(generation_mode=mode) for op in operations for mode in GenerationMode]
    )

    @given(cases)
    @settings(
        max_examples=120, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    def check(case) -> None:
        case.call_and_validate(headers=AUTH, checks=[not_a_server_error], timeout=10)

    try:
        check()
    finally:
        rclient.delete(f"{SERVICES_PREFIX}sampler:sampler-fuzz")
