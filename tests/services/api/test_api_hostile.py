"""The control API against hostile or broken input: nothing is parsed before the token is
checked, bodies are bounded, and no input makes it answer 5xx."""

from __future__ import annotations

import json

import httpx
import pytest
import redis

from dapo.runtime.runs import RunStore
from proto.keys import SERVICES_PREFIX
from services.api.app import create_app
from services.api.settings import ApiSettings
from tests.servers import serve_in_thread

TOKEN = "hostile-test-token-1b2c"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def db_url(redis_server) -> str:
    return redis_server.rsplit("/", 1)[0] + "/15"  # a database of its own


@pytest.fixture(scope="module")
def base_url(db_url):
    settings = ApiSettings(redis_url=db_url, token=TOKEN, max_body_bytes=64 * 1024)
    with serve_in_thread(create_app(settings, redis.Redis.from_url(db_url))) as url:
        yield url


@pytest.fixture
def idle(db_url):
    store = RunStore(redis.Redis.from_url(db_url))
    for state in store.active():
        store.set_status(state.run_id, "stopped")
    return store


def raw_post(base_url: str, body: bytes, headers: dict) -> httpx.Response:
    return httpx.post(
        f"{base_url}/v1/runs",
        content=body,
        headers={"Content-Type": "application/json", **headers},
        timeout=30,
    )


def test_a_body_without_the_token_is_refused_before_it_is_read(base_url):
    # a malformed body: had it been parsed first the answer would be 422, not 401
    assert raw_post(base_url, b"{not json", {}).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert raw_post(base_url, b'{"name": 5}', wrong).status_code == 401


def test_bodies_are_bounded(base_url, idle):
    big = b'{"name": "' + b"x" * (128 * 1024) + b'"}'
    r = raw_post(base_url, big, AUTH)
    assert r.status_code == 413 and "64 KiB" in r.json()["detail"]

    def chunks():  # no Content-Length: the limit holds while streaming
        yield b'{"name": "'
        for _ in range(200):
            yield b"x" * 1024
        yield b'"}'

    r = httpx.post(
        f"{base_url}/v1/runs",
        content=chunks(),
        headers={"Content-Type": "application/json", **AUTH},
        timeout=30,
    )
    assert r.status_code == 413


@pytest.mark.parametrize(
    "body",
    [
        b'{"actor": {"optim": {"lr": NaN}}}',
        b'{"actor": {"optim": {"lr": Infinity}}}',
        b'{"actor": {"optim": {"lr": 1e999}}}',
        b'{"actor": {"clip_ratio_low": NaN}}',
        b'{"name": "\\ud800"}',
        b'{"data": {"train_files": ["\\udfff.parquet"]}}',
        b'{"seed": 1e40}',
        b'{"data": {"seed": 100000000000000000000000000000000000000000}}',
        b'{"reward": {"timeout_s": 1e12}}',
        b"[" * 5000 + b"]" * 5000,
    ],
)
def test_hostile_values_are_4xx_never_5xx(base_url, idle, body):
    r = raw_post(base_url, body, AUTH)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    json.loads(r.text)  # the error itself is valid JSON


def test_a_malformed_registry_entry_does_not_break_readyz(base_url, db_url):
    client = redis.Redis.from_url(db_url)
    client.set(f"{SERVICES_PREFIX}rollout:broken", b"\xff not json", ex=30)
    client.set(f"{SERVICES_PREFIX}reward:ok", json.dumps({"kind": "reward", "worker_id": "ok"}),
               ex=30)  # fmt: skip
    try:
        r = httpx.get(f"{base_url}/readyz", timeout=10)
        assert r.status_code == 200 and r.json()["services"] == ["reward"]
    finally:
        client.delete(f"{SERVICES_PREFIX}rollout:broken", f"{SERVICES_PREFIX}reward:ok")
