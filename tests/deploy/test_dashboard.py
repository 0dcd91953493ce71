"""Every service's /metrics during a real run, and every Grafana panel's query answered with
data by a live Prometheus that scraped that run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dapo.transport.redis_embed import free_port
from tests.e2e_helpers import make_dataset, make_model_dir, small_spec, start_run

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "grafana-dashboard.json"
KEY_SERIES = {
    "sampler": {"dapo_sampler_groups", "dapo_stream_lag", "dapo_dead_letters"},
    "reward": {"dapo_reward_samples", "dapo_reward_score"},
    "rollout": {"dapo_rollout_generated_tokens", "dapo_rollout_policy_version"},
    "learner": {"dapo_learner_step", "dapo_learner_loss", "dapo_weight_sync_seconds"},
}


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found:
        return found
    if os.environ.get("CI") == "true":
        pytest.fail("CI must have prometheus installed (.ci/run installs Debian's package)")
    pytest.skip("no prometheus binary on PATH (apt-get install prometheus); CI always has one")


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read()


def families(port: int) -> set[str]:
    text = get(f"http://127.0.0.1:{port}/metrics").decode()
    return {f.name for f in text_string_to_metric_families(text)}


def panel_queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


def start_prometheus(tmp_path: Path, targets: list[str]) -> tuple[subprocess.Popen, int]:
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n  - job_name: dapo\n    static_configs:\n"
        f"      - targets: {json.dumps(targets)}\n"
    )
    proc = subprocess.Popen(
        [
            prometheus_binary(),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "prometheus.log").open("w"),
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            get(f"http://127.0.0.1:{port}/-/ready")
            return proc, port
        except OSError:
            assert time.monotonic() < deadline and proc.poll() is None, (
                tmp_path / "prometheus.log"
            ).read_text()[-2000:]
            time.sleep(0.2)


def query_range(port: int, expr: str, seconds: int = 300) -> list:
    now = time.time()
    qs = urllib.parse.urlencode({"query": expr, "start": now - seconds, "end": now, "step": "1"})
    body = json.loads(get(f"http://127.0.0.1:{port}/api/v1/query_range?{qs}"))
    assert body["status"] == "success", body
    return [s for s in body["data"]["result"] if s["values"]]


def test_metrics_and_every_dashboard_panel_have_data(tmp_path, redis_url):
    binary = prometheus_binary()
    assert binary
    spec = small_spec(
        make_model_dir(tmp_path / "model"),
        make_dataset(tmp_path / "d.jsonl"),
        tmp_path / "runs",
        trainer={
            "total_training_steps": 100000,
            "save_freq": 0,
            "runs_dir": str(tmp_path / "runs"),
        },
    )
    store, stack = start_run(redis_url, spec, rollout_workers=1)
    prom = None
    try:
        prom, prom_port = start_prometheus(tmp_path, [f"127.0.0.1:{p.port}" for p in stack.procs])
        deadline = time.monotonic() + 120
        while store.state(stack.run_id).step < 4:
            assert time.monotonic() < deadline, "run made no progress"
            stack.check_alive()
            time.sleep(0.3)
        for p in stack.procs:  # every service's /metrics parses and has its key series
            missing = KEY_SERIES[p.kind] - families(p.port)
            assert not missing, f"{p.worker_id} lacks {missing}"
        # the run goes on while Prometheus scrapes it: every panel must get data in time
        empty = panel_queries()
        deadline = time.monotonic() + 120
        while empty and time.monotonic() < deadline:
            stack.check_alive()
            empty = [(title, expr) for title, expr in empty if not query_range(prom_port, expr)]
            time.sleep(1.0)
        assert not empty, f"panels without data: {empty}"
    finally:
        stack.stop()
        if prom is not None:
            prom.terminate()
            prom.wait(timeout=10)
