"""The chart's Redis, run for real: its init container's ACL script and its server arguments,
taken from the rendered StatefulSet and run here with the local redis-server, and TLS
certificates made with openssl. Its paths (/acl, /data, /tls) become temporary folders."""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from dapo.transport.redis_embed import find_redis_server, free_port
from tests.deploy.chart_helpers import env_of, render_with, workload


@dataclass
class ChartRedis:
    proc: subprocess.Popen
    port: int
    password: str
    username: str | None
    objs: tuple[dict, ...]
    """The rendered objects of the release."""
    log: Path

    @property
    def pod(self) -> dict:
        """The pod spec of the Redis StatefulSet."""
        return workload(self.objs, "redis")["spec"]["template"]["spec"]

    def url(self, scheme: str = "redis", host: str = "127.0.0.1") -> str:
        return f"{scheme}://{host}:{self.port}/0"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def make_certs(folder: Path, name: str = "ca") -> Path:
    """A CA and a server certificate for localhost and 127.0.0.1, in ``folder``, as
    cert-manager lays out a TLS Secret (tls.crt, tls.key, ca.crt)."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl binary to make test certificates with")
    folder.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
            "-subj", f"/CN={name}")  # fmt: skip
    openssl("req", *ec, "-keyout", "tls.key", "-out", "tls.csr", "-subj", "/CN=localhost")
    (folder / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "tls.crt", "-days", "1", "-extfile", "san.ext")  # fmt: skip
    return folder


def _local(arg: str, dirs: dict[str, Path]) -> str:
    for inside, here in dirs.items():
        if arg == inside or arg.startswith(inside + "/"):
            return str(here) + arg[len(inside) :]
    return arg


def start_chart_redis(tmp_path: Path, values: dict, password: str = "pw-0f-test") -> ChartRedis:
    """The Redis of the chart rendered with ``values`` (its port replaced by a free one),
    listening on 127.0.0.1 only; with TLS values, on certificates from ``make_certs``."""
    port = free_port()
    values = {**values, "redis": {**values.get("redis", {}), "port": port}}
    objs = render_with(values)
    pod = workload(objs, "redis")["spec"]["template"]["spec"]
    (init,), (server,) = pod["initContainers"], pod["containers"]
    dirs = {"/acl": tmp_path / "acl", "/data": tmp_path / "data", "/tls": tmp_path / "tls"}
    for folder in dirs.values():
        folder.mkdir(parents=True, exist_ok=True)
    if "--tls-port" in server["args"]:
        make_certs(dirs["/tls"])
    username = env_of(init).get("REDIS_USERNAME")
    env = {"PATH": "/usr/bin:/bin", "REDIS_PASSWORD": password, **({"REDIS_USERNAME": username} if username else {})}  # fmt: skip
    script = init["args"][0].replace("/acl/", f"{dirs['/acl']}/")
    subprocess.run([*init["command"], script], env=env, check=True)
    log = tmp_path / "redis.log"
    args = [_local(a, dirs) for a in server["args"]]
    proc = subprocess.Popen(
        [find_redis_server(), *args, "--bind", "127.0.0.1", "--logfile", str(log)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    started = ChartRedis(proc, port, password, username, objs, log)
    deadline = time.monotonic() + 15
    while not (tmp_path / "redis.log").exists() or "Ready to accept" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            started.stop() if proc.poll() is None else None
            raise RuntimeError(f"the chart's redis-server did not start:\n{log.read_text()}")
        time.sleep(0.05)
    return started


def login(r: ChartRedis, **options) -> redis.Redis:
    """A plain client logged in as the chart's services are."""
    return redis.Redis(port=r.port, password=r.password, username=r.username, **options)
