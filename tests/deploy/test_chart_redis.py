"""Redis of the chart: the login reaches pods only through Secrets, the in-cluster server
refuses clients without it, TLS is verified, and maxmemory fits under the memory limit.
The server checks run the rendered init script and arguments with a real redis-server."""

from __future__ import annotations

import base64
import os
import signal
import subprocess

import helm_python as helm
import pytest
import redis

from dapo.runtime.config import ServiceSettings
from dapo.runtime.service import ServiceRuntime
from dapo.transport.redis_bus import connect
from tests.deploy.chart_helpers import (
    COMPONENTS,
    GOOD_SETS,
    _chart,
    container,
    env_of,
    find,
    render,
    render_files,
    render_with,
    secret_refs,
    values_of,
    workload,
)
from tests.deploy.chart_redis import login, make_certs, start_chart_redis


@pytest.fixture
def signals():
    """ServiceRuntime takes SIGTERM and SIGINT for its graceful stop: give them back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
UNITS |= {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity_bytes(q: str | int) -> int:
    """A memory quantity of the values in bytes, as Kubernetes reads it."""
    text = str(q)
    number = text.rstrip("kMGTi")
    return int(float(number) * UNITS[text[len(number) :]])


def redis_clients(objs) -> list[dict]:
    return [container(objs, name) for name in COMPONENTS]


@pytest.mark.parametrize("values", GOOD_SETS)
def test_the_password_reaches_pods_only_through_a_secret(values):
    objs, vals = render(values), _chart().merge_values(values_of(values))
    auth = vals["redis"]["auth"]
    secret = auth["existingSecret"] or "dapo-redis-auth"
    for c in redis_clients(objs):
        assert secret_refs(c)["DAPO_REDIS_PASSWORD"] == (secret, auth["passwordKey"])
        env = env_of(c)
        assert "@" not in env["DAPO_REDIS_URL"]  # no login inside the URL
        assert env.get("DAPO_REDIS_USERNAME") == (auth["username"] or None)
    for tmpl in [o["spec"]["template"]["spec"] for o in objs if "template" in o.get("spec", {})]:
        for c in tmpl["containers"] + tmpl.get("initContainers", []):
            for e in c.get("env", []):
                if e["name"].endswith(("PASSWORD", "_AUTH", "_TOKEN")):
                    assert "value" not in e, f"{c['name']}: {e['name']} is a plain value"
    made = find(objs, "Secret", "redis")
    if auth["existingSecret"]:
        assert not made
        return
    (made,) = made
    password = base64.b64decode(made["data"][auth["passwordKey"]]).decode()
    assert len(password) >= 32
    files = render_files(values)
    # Drawn per render here (lookup keeps it on a live release); in no other object.
    others = {k: v for k, v in files.items() if k != "redis-auth.yaml"}
    assert not any(password in text for text in others.values())


def test_in_cluster_redis_arguments():
    objs, vals = render(None), _chart().merge_values({})
    args = container(objs, "redis")["args"]
    flags = dict(zip(args[::2], args[1::2], strict=True))
    assert flags["--protected-mode"] == "yes" and flags["--aclfile"] == "/acl/users.acl"
    assert flags["--maxmemory-policy"] == "noeviction"
    assert int(flags["--maxmemory"]) == quantity_bytes(vals["redis"]["maxmemory"])
    pod = workload(objs, "redis")["spec"]["template"]["spec"]
    (acl,) = [v for v in pod["volumes"] if v["name"] == "acl"]
    assert acl["emptyDir"]["medium"] == "Memory"  # the password's hash never on disk
    assert "REDISCLI_AUTH" in secret_refs(container(objs, "redis"))


@pytest.mark.parametrize("values", GOOD_SETS)
def test_redis_memory_limit_exceeds_maxmemory(values):
    objs, vals = render(values), _chart().merge_values(values_of(values))
    if vals["redis"]["external"]["url"]:
        assert not find(objs, "StatefulSet", "redis")
        return
    limit = container(objs, "redis")["resources"]["limits"]["memory"]
    assert quantity_bytes(limit) > quantity_bytes(vals["redis"]["maxmemory"])


@pytest.mark.parametrize(
    ("values", "says"),
    [
        ({"redis": {"maxmemory": "4Gi"}}, "must exceed redis.maxmemory"),
        ({"redis": {"maxmemory": 5368709120}}, "must exceed redis.maxmemory"),
        ({"redis": {"external": {"url": "redis://r:6379/0"}}}, "redis.auth.existingSecret"),
        ({"redis": {"tls": {"enabled": True}}}, "redis.tls.existingSecret"),
        (
            {
                "redis": {
                    "external": {"url": "redis://r:6379/0"},
                    "auth": {"existingSecret": "s"},
                    "tls": {"enabled": True, "existingSecret": "ca"},
                }
            },
            "rediss://",
        ),
    ],
)
def test_values_that_cannot_work_fail_the_render(values, says):
    with pytest.raises(helm.HelmRenderError) as err:
        render_with(values)
    assert says in str(err.value)


def test_tls_clients_verify_against_the_mounted_ca():
    objs = render("redis-acl-tls")
    for c in redis_clients(objs):
        env = env_of(c)
        assert env["DAPO_REDIS_URL"] == "rediss://dapo-redis:6379/0"
        ca = env["DAPO_REDIS_TLS_CA"]
        mount = next(m for m in c["volumeMounts"] if ca.startswith(m["mountPath"] + "/"))
        assert mount["readOnly"] is True
    pod = workload(objs, "rollout")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "dapo-redis-tls"
    assert volume["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    args = container(objs, "redis")["args"]
    assert args[args.index("--port") + 1] == "0" and "--tls-port" in args
    external = render("external-redis")
    ca_items = [v["secret"]["items"] for v in workload(external, "api")["spec"]["template"]["spec"]["volumes"] if v["name"] == "redis-ca"]  # fmt: skip
    assert ca_items == [[{"key": "ca.pem", "path": "ca.crt"}]]


@pytest.mark.parametrize("username", [None, "dapo"])
def test_the_chart_redis_requires_its_login(tmp_path, username):
    values = {"redis": {"maxmemory": "8Mi", "auth": {"username": username or ""}}}
    r = start_chart_redis(tmp_path, values)
    try:
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=r.port).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=r.port, password="wrong", username=username).ping()
        client = login(r)
        assert client.ping() and client.set("k", "v")
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.config_set("dir", "/tmp")  # no server administration for applications
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            for i in range(8):  # past maxmemory a write fails; nothing is evicted
                client.set(f"big{i}", b"x" * (2 << 20))
        assert client.get("k") == b"v"
        if username:  # the default user is off
            with pytest.raises(redis.AuthenticationError):
                redis.Redis(port=r.port, password=r.password).ping()
        probe = subprocess.run(container_probe(r), env={"REDISCLI_AUTH": r.password},
                               capture_output=True, text=True)  # fmt: skip
        assert probe.stdout.strip() == "PONG"
    finally:
        r.stop()


def container_probe(r) -> list[str]:
    command = r.pod["containers"][0]["readinessProbe"]["exec"]["command"]
    return [a.replace("/tls/", f"{r.log.parent}/tls/") for a in command]


def test_services_log_in_over_verified_tls(tmp_path, monkeypatch, signals):
    """A service shell from the rendered env: TLS to the chart's Redis, verified against the
    mounted CA; a client trusting another CA is refused."""
    r = start_chart_redis(tmp_path, {"redis": {"tls": {"enabled": True, "existingSecret": "t"}}})
    try:
        ca = tmp_path / "tls" / "ca.crt"
        url = r.url("rediss", "localhost")
        assert env_of(container(r.objs, "sampler"))["DAPO_REDIS_URL"] == r.url(
            "rediss", "dapo-redis"
        )
        assert url.startswith("rediss://")
        client = connect(url, password=r.password, tls_ca=ca)
        run_id = create_run(client)
        for k in [k for k in os.environ if k.startswith("DAPO_")]:
            monkeypatch.delenv(k)
        settings = ServiceSettings(redis_url=url, redis_password=r.password, redis_tls_ca=ca,
                                   run_id=run_id)  # fmt: skip
        with ServiceRuntime("sampler", settings) as rt:
            assert rt.ctx.run_id == run_id and rt.client.ping()
        other = make_certs(tmp_path / "other", "another-ca") / "ca.crt"
        with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            connect(url, password=r.password, tls_ca=other).ping()
    finally:
        r.stop()


def create_run(client) -> str:
    from dapo.runtime.runs import RunStore
    from proto.runspec import RunSpec

    store = RunStore(client)
    run_id = store.create(RunSpec()).run_id
    store.set_status(run_id, "running")
    return run_id
