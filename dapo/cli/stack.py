"""``dapo up``: the whole local stack as processes, one training run, before/after eval.

Order: validate the config and the datasets (nothing starts on bad input),
build the default task if needed, start Redis (embedded unless
DAPO_REDIS_URL is set), create the run, evaluate the base policy, start the
four services, wait until each answers /readyz, let them train while showing
progress, evaluate the final checkpoint, write ``summary.json`` and the
curves, and stop every process. Ctrl-C asks for a graceful stop: the learner
writes a final checkpoint, then everything exits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dapo.transport.redis_embed import free_port

SERVICE_ORDER = ("sampler", "reward", "rollout", "learner")


@dataclass(frozen=True)
class RestartPolicy:
    """How the local stack restarts a service that died, as Kubernetes would restart its pod:
    the same worker id (it resumes its own pending work), after a back-off that doubles."""

    max_restarts: int = 5
    """Restarts per process over the run; one more death fails the run."""
    backoff_s: float = 1.0
    """Delay before the first restart; doubled for each later one."""
    max_backoff_s: float = 30.0
    """Cap on the delay."""

    def delay(self, restarts: int) -> float:
        return min(self.backoff_s * 2**restarts, self.max_backoff_s)


@dataclass
class Proc:
    kind: str
    worker_id: str
    port: int
    popen: subprocess.Popen
    log_path: Path
    env: dict = field(default_factory=dict, repr=False)
    restarts: int = 0
    restart_at: float | None = None
    """When a dead process is due to be started again (None: alive, or not yet seen dead)."""

    def healthy(self, path: str = "/readyz") -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False


@dataclass
class Stack:
    redis_url: str
    run_id: str
    run_dir: Path
    threads: int = 1
    procs: list[Proc] = field(default_factory=list)
    restart: RestartPolicy = field(default_factory=RestartPolicy)

    def start(self, kind: str, index: int = 0, extra_env: dict | None = None) -> Proc:
        port = free_port()
        worker_id = f"{kind}-{index}"
        log_path = self.run_dir / "logs" / f"{worker_id}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(
            os.environ,
            DAPO_REDIS_URL=self.redis_url,
            DAPO_RUN_ID=self.run_id,
            DAPO_WORKER_ID=worker_id,
            DAPO_HEALTH_PORT=str(port),
            DAPO_PORT=str(port),
            DAPO_THREADS=str(self.threads),
            **(extra_env or {}),
        )
        proc = Proc(kind, worker_id, port, _spawn(kind, env, log_path, "w"), log_path, env)
        self.procs.append(proc)
        return proc

    def supervise(self, on_restart: Callable[[Proc], None] | None = None) -> None:
        """Restart every service that died (non-zero exit), after its back-off, under the same
        worker id and port; ``on_restart`` is told of each restart. A process that dies once
        more than ``restart.max_restarts`` times raises, with the tail of its log. A clean
        exit (0) means the service finished its part of the run and is left alone."""
        now = time.monotonic()
        for p in self.procs:
            code = p.popen.poll()
            if code in (None, 0):
                continue
            if p.restart_at is None:
                if p.restarts >= self.restart.max_restarts:
                    raise RuntimeError(
                        f"{p.worker_id} died (exit {code}) after {p.restarts} restarts; "
                        f"giving up:\n{tail(p.log_path)}"
                    )
                delay = self.restart.delay(p.restarts)
                p.restart_at = now + delay
                print(
                    f"{p.worker_id} died (exit {code}); restarting in {delay:.1f}s "
                    f"(restart {p.restarts + 1} of at most {self.restart.max_restarts}, "
                    f"log {p.log_path})",
                    file=sys.stderr,
                    flush=True,
                )
            elif now >= p.restart_at:
                with p.log_path.open("a") as f:
                    f.write(f"\n--- restarted by the supervisor (restart {p.restarts + 1}) ---\n")
                p.popen = _spawn(p.kind, p.env, p.log_path, "a")
                p.restarts += 1
                p.restart_at = None
                if on_restart is not None:
                    on_restart(p)

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        pending = list(self.procs)
        while pending:
            for p in list(pending):
                if p.popen.poll() is not None:
                    raise RuntimeError(f"{p.worker_id} exited during start-up:\n{tail(p.log_path)}")
                if p.healthy():
                    pending.remove(p)
            if time.monotonic() > deadline:
                names = ", ".join(p.worker_id for p in pending)
                raise RuntimeError(f"not ready after {timeout_s:.0f}s: {names}")
            time.sleep(0.3)

    def check_alive(self) -> None:
        for p in self.procs:
            code = p.popen.poll()
            if code not in (None, 0):
                raise RuntimeError(f"{p.worker_id} died (exit {code}):\n{tail(p.log_path)}")

    def stop(self, grace_s: float = 30.0) -> None:
        for p in self.procs:
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(timeout=max(deadline - time.monotonic(), 0.1))
            if p.popen.poll() is None:
                p.popen.kill()
                p.popen.wait()


def _spawn(kind: str, env: dict, log_path: Path, mode: str) -> subprocess.Popen:
    with log_path.open(mode) as log_file:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "dapo.cli", "service", kind],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def print_table(procs: list[Proc]) -> None:
    print(f"{'service':<12}{'pid':>8}{'port':>8}  health")
    for p in procs:
        ok = p.healthy("/healthz") and p.healthy("/readyz")
        print(f"{p.worker_id:<12}{p.popen.pid:>8}{p.port:>8}  {'healthy' if ok else 'NOT READY'}")
