"""Every service's /metrics during a real run, and every Grafana panel's query answered with
data by a live Prometheus that scraped that run; that Prometheus also evaluates the watchdog
alert rules, whose every series must exist. The run's Redis is the chart's own (its ACL
script and arguments, tests/deploy/chart_redis.py), and the services log in to it as the
chart's pods do: so a command the ACL refuses, or a missing login, fails this run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from dapo.cli.stack import Stack
from dapo.runtime.runs import RunStore
from dapo.transport.redis_embed import free_port
from tests.deploy.chart_redis import ChartRedis, login, start_chart_redis
from tests.e2e_helpers import make_dataset, make_model_dir, small_spec

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
DASHBOARD = K8S / "grafana-dashboard.json"
RULES = K8S / "alerts" / "dapo-rules.yaml"
PROGRESS = "dapo_last_progress_timestamp_seconds"
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


def families(port: int) -> dict[str, list]:
    text = get(f"http://127.0.0.1:{port}/metrics").decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def panel_queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


def rule_selectors() -> list[str]:
    """Every series selector of the alert rules, with its label matchers."""
    exprs = " ".join(
        r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]
    )
    return sorted(set(re.findall(r"\bdapo_[a-z_]+(?:\{[^}]*\})?", exprs)))


def start_prometheus(tmp_path: Path, targets: list[str]) -> tuple[subprocess.Popen, int]:
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: [{json.dumps(str(RULES))}]\n"
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


def rule_health(port: int) -> dict[str, str]:
    body = json.loads(get(f"http://127.0.0.1:{port}/api/v1/rules"))
    return {r["name"]: r["health"] for g in body["data"]["groups"] for r in g["rules"]}


def start_logged_in(redis: ChartRedis, spec, rollout_workers: int) -> tuple[RunStore, Stack]:
    """The run on the chart's Redis, every service given the login as the chart's pods get it
    (DAPO_REDIS_PASSWORD and DAPO_REDIS_USERNAME; the URL carries none)."""
    store = RunStore(login(redis))
    run_id = store.create(spec).run_id
    stack = Stack(redis.url(), run_id, Path(spec.trainer.runs_dir) / run_id, threads=1)
    env = {"DAPO_REDIS_PASSWORD": redis.password, "DAPO_REDIS_USERNAME": redis.username}
    for kind in ("sampler", "reward", "learner", *["rollout"] * rollout_workers):
        stack.start(kind, sum(p.kind == kind for p in stack.procs), extra_env=env)
    stack.wait_ready(timeout_s=120)
    store.set_status(run_id, "running")
    return store, stack


def test_metrics_and_every_dashboard_panel_have_data(tmp_path):
    binary = prometheus_binary()
    assert binary
    redis = start_chart_redis(tmp_path / "redis", {"redis": {"auth": {"username": "dapo"}}})
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
    prom = stack = None
    try:
        store, stack = start_logged_in(redis, spec, rollout_workers=1)
        running = time.time()
        prom, prom_port = start_prometheus(tmp_path, [f"127.0.0.1:{p.port}" for p in stack.procs])
        deadline = time.monotonic() + 120
        while store.state(stack.run_id).step < 4:
            assert time.monotonic() < deadline, "run made no progress"
            stack.check_alive()
            time.sleep(0.3)
        for p in stack.procs:  # every service's /metrics parses and has its key series
            found = families(p.port)
            missing = KEY_SERIES[p.kind] - set(found)
            assert not missing, f"{p.worker_id} lacks {missing}"
            # and has got work done since the run started (its progress() calls)
            ((_, labels, last, *_),) = found[PROGRESS]
            assert labels == {"component": p.kind} and last > running, p.worker_id
        # the run goes on while Prometheus scrapes it: every panel must get data in time
        # ... and every series the alert rules read, which Prometheus evaluates without error
        empty = panel_queries() + [("alert rules", sel) for sel in rule_selectors()]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            stack.check_alive()
            empty = [(title, expr) for title, expr in empty if not query_range(prom_port, expr)]
            health = rule_health(prom_port)
            if not empty and set(health.values()) == {"ok"}:
                break
            time.sleep(1.0)
        assert not empty, f"panels without data: {empty}"
        assert set(health.values()) == {"ok"}, health
    finally:
        if stack is not None:
            stack.stop()
        redis.stop()
        if prom is not None:
            prom.terminate()
            prom.wait(timeout=10)
