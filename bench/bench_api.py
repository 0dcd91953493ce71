"""Latency of the control API's run status (``GET /v1/runs/{id}``) under a steady load.

A real uvicorn process (``python -m services.api.main``) over an embedded
Redis, one run created through the API with a 200-line metrics.jsonl and a
filled sampler account. Requests go out on a fixed schedule of 200 per second
for 5 s over one keep-alive connection; each latency is measured from the
request's *scheduled* time, so a slow answer also charges the requests it
delayed (no coordinated omission).

Figures: ``api.status_p50_ms``, ``api.status_p99_ms``, ``api.status_rps`` (achieved rate).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import redis

from dapo.transport.redis_embed import EmbeddedRedis, free_port
from proto.keys import run_key

RATE_PER_S = 200
DURATION_S = 5.0
WARMUP = 50
TOKEN = "bench-api-token-3c8e"
REPO = Path(__file__).resolve().parent.parent


def _start_server(redis_url: str, port: int) -> subprocess.Popen:
    env = {
        **os.environ,
        "DAPO_REDIS_URL": redis_url,
        "DAPO_PORT": str(port),
        "DAPO_API_TOKEN": TOKEN,
        "DAPO_LOG_LEVEL": "WARNING",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    }
    env.pop("DAPO_API_TOKEN_FILE", None)
    env.pop("DAPO_AUTOSTART_CONFIG", None)
    return subprocess.Popen([sys.executable, "-m", "services.api.main"], env=env, cwd=REPO)


def _wait_ready(http: httpx.Client, proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if http.get("/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("API server did not come up")
        time.sleep(0.1)


def _create_run(http: httpx.Client, client: redis.Redis, runs_dir: Path) -> str:
    spec = {"name": "bench", "trainer": {"runs_dir": str(runs_dir)}}
    resp = http.post("/v1/runs", json=spec)
    resp.raise_for_status()
    run_id = resp.json()["run_id"]
    (runs_dir / run_id).mkdir(parents=True)
    with (runs_dir / run_id / "metrics.jsonl").open("w") as f:
        for step in range(1, 201):
            figures = {
                "step": step,
                "loss": 0.1,
                "reward_mean": 0.2,
                "acc_mean": 0.6,
                "kept_ratio": 0.5,
                "entropy": 1.2,
                "version_lag": 0.5,
                "train_s": 3.0,
            }
            f.write(json.dumps(figures) + "\n")
    client.hset(
        run_key(run_id, "account"),
        mapping={
            "dispatched": 7000,
            "trained": 3200,
            "filtered_all_correct": 1500,
            "filtered_all_wrong": 1700,
            "dropped_stale": 40,
            "batches": 200,
        },
    )
    return run_id


def _paced_latencies(http: httpx.Client, path: str) -> tuple[np.ndarray, float]:
    interval = 1.0 / RATE_PER_S
    n = int(RATE_PER_S * DURATION_S)
    lat = np.empty(n)  # (n,) seconds from scheduled send to full answer
    t0 = time.perf_counter()
    for i in range(n):
        scheduled = t0 + i * interval
        wait = scheduled - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        resp = http.get(path)
        if resp.status_code != 200:
            raise RuntimeError(f"GET {path} -> {resp.status_code}: {resp.text[:300]}")
        lat[i] = time.perf_counter() - scheduled
    return lat, n / (time.perf_counter() - t0)


def run() -> dict[str, float]:
    port = free_port()
    with EmbeddedRedis() as embedded, tempfile.TemporaryDirectory() as tmp:
        proc = _start_server(embedded.url, port)
        try:
            headers = {"Authorization": f"Bearer {TOKEN}"}
            with httpx.Client(
                base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=10
            ) as http:
                _wait_ready(http, proc)
                run_id = _create_run(http, redis.Redis.from_url(embedded.url), Path(tmp))
                path = f"/v1/runs/{run_id}"
                for _ in range(WARMUP):
                    http.get(path).raise_for_status()
                lat, rps = _paced_latencies(http, path)
        finally:
            proc.terminate()
            proc.wait(timeout=15)
    return {
        "api.status_p50_ms": float(np.percentile(lat, 50) * 1e3),
        "api.status_p99_ms": float(np.percentile(lat, 99) * 1e3),
        "api.status_rps": float(rps),
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
