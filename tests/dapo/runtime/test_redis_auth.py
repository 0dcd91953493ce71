"""Services log in to a Redis that requires it: a real redis-server started with
--requirepass (and an ACL user), the service shell and the control API connecting with the
password from their settings, and refused, at once, without it."""

from __future__ import annotations

import os
import signal
import time

import pytest
import redis
from fastapi.testclient import TestClient

from dapo.runtime.config import ConfigError, ServiceSettings
from dapo.runtime.runs import RunStore
from dapo.runtime.service import ServiceRuntime
from dapo.transport.redis_bus import connect
from dapo.transport.redis_embed import EmbeddedRedis
from proto.runspec import RunSpec
from services.api.app import create_app
from services.api.settings import ApiSettings

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def locked():
    """A redis-server that lets nobody in without PASSWORD, with one running run."""
    with EmbeddedRedis(password=PASSWORD) as server:
        client = connect(server.url, password=PASSWORD)
        client.acl_setuser("dapo", enabled=True, passwords=["+user-pass"], keys=["*"],
                           channels=["*"], commands=["+@all"])  # fmt: skip
        store = RunStore(client)
        run_id = store.create(RunSpec()).run_id
        store.set_status(run_id, "running")
        yield server.url, run_id


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    """No DAPO_* of the outer environment, and SIGTERM/SIGINT given back after the runtime."""
    for name in [n for n in os.environ if n.startswith("DAPO_")]:
        monkeypatch.delenv(name)
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize(("username", "password"), [(None, PASSWORD), ("dapo", "user-pass")])
def test_a_service_runtime_logs_in_with_its_password(locked, monkeypatch, username, password):
    url, run_id = locked
    monkeypatch.setenv("DAPO_REDIS_PASSWORD", password)  # as the pod's secretKeyRef sets it
    if username:
        monkeypatch.setenv("DAPO_REDIS_USERNAME", username)
    settings = ServiceSettings.from_env(redis_url=url, run_id=run_id, worker_id="sampler-0")
    assert password not in repr(settings)
    with ServiceRuntime("sampler", settings) as rt:
        assert rt.ctx.run_id == run_id and rt.ctx.spec == RunSpec()
        assert rt.client.acl_whoami() == (username or "default")
        assert rt._ready() == (True, "ready")


@pytest.mark.parametrize("password", [None, "wrong"])
def test_without_the_password_the_runtime_is_refused_at_once(locked, password):
    url, run_id = locked
    rt = ServiceRuntime("sampler", ServiceSettings(redis_url=url, run_id=run_id,
                                                   redis_password=password))  # fmt: skip
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="Redis refused the login"):
        rt.__enter__()
    rt.health.stop()
    assert time.monotonic() - started < 10  # no minute of retries: waiting cannot fix it


def test_the_api_logs_in_with_its_password(locked):
    url, _ = locked
    for password, status in ((PASSWORD, 200), (None, 503)):
        settings = ApiSettings(redis_url=url, redis_password=password, auth_disabled=True)
        with TestClient(create_app(settings)) as http:
            assert http.get("/readyz").status_code == status


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"redis_password": ""}, "DAPO_REDIS_PASSWORD is empty"),
        ({"redis_username": "dapo"}, "DAPO_REDIS_USERNAME needs DAPO_REDIS_PASSWORD"),
        ({"redis_username": "da po", "redis_password": "p"}, "redis_username"),
        ({"redis_url": "redis://:pw@h:6379/0", "redis_password": "p"}, "not both"),
        ({"redis_url": "rediss://h:6379/0?ssl_cert_reqs=none"}, "TLS options"),
        ({"redis_tls_ca": "{ca}"}, "needs a rediss://"),
        ({"redis_url": "rediss://h:6379/0", "redis_tls_ca": "{missing}"}, "is not a file"),
    ],
)
def test_a_login_that_cannot_work_is_refused_naming_why(tmp_path, fields, says):
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    paths = {"{ca}": str(ca), "{missing}": str(tmp_path / "nope.crt")}
    fields = {k: paths.get(v, v) for k, v in fields.items()}
    with pytest.raises(ConfigError, match=says):
        ServiceSettings.from_env(**fields)


def test_tls_settings_reach_the_client(tmp_path):
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    client = connect("rediss://h:6380/0", password="p", username="u", tls_ca=ca)
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["ssl_ca_certs"], kwargs["ssl_cert_reqs"], kwargs["ssl_check_hostname"]) == (
        str(ca),
        "required",
        True,
    )
    assert (kwargs["password"], kwargs["username"]) == ("p", "u")
    with pytest.raises(ValueError, match="not rediss://"):
        connect("redis://h:6379/0", tls_ca=ca)
    assert redis.Redis is type(client)
