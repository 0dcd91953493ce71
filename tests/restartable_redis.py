"""A redis-server that a test kills and starts again on the same port and data: an outage
the services see as refused connections, after which the run is still there (append-only
file, fsync on every write)."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from dapo.transport.redis_embed import find_redis_server, free_port


@dataclass
class RestartableRedis:
    """``with RestartableRedis(dir) as r``: ``r.kill()`` (SIGKILL, nothing flushed beyond the
    append-only file) and ``r.start()`` again."""

    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    appendfsync: str = "always"
    """always by default: a test's figures must not depend on a lost second of writes."""

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 60.0) -> RestartableRedis:
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "yes", "--appendfsync", self.appendfsync]
        args += ["--dir", str(self.workdir)]
        args += ["--logfile", str(self.workdir / "redis.log")]
        self.proc = subprocess.Popen(
            [find_redis_server(), *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=1.0, socket_timeout=2.0)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client.ping()
                client.close()
                return self
            except (redis.ConnectionError, redis.TimeoutError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start: {self.log_tail()}") from None
                time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.proc = None

    def log_tail(self) -> str:
        path = self.workdir / "redis.log"
        return path.read_text(errors="replace")[-2000:] if path.is_file() else "(no log)"

    def __enter__(self) -> RestartableRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()
