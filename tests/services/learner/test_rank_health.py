"""Every pod of a multi-node learner answers its probes: two real torchrun nodes (one rank
each, gloo, c10d rendezvous on loopback) stand for two learner pods; the pod without rank 0
serves /healthz, /readyz and /metrics from its rank 1 while that rank waits on rank 0 in a
collective, and both nodes exit cleanly when the run ends."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import redis

from dapo.runtime.runs import RunStore
from dapo.transport.redis_embed import free_port
from services.learner.main import FOLLOWING, LearnerSettings, follower_health
from services.learner.ranks import GroupRanks, SoloRanks
from tests.e2e_helpers import make_dataset, make_model_dir, small_spec

ROOT = Path(__file__).resolve().parents[3]


def test_only_the_first_rank_of_a_node_without_rank_0_serves_the_pod():
    assert follower_health(LearnerSettings(local_rank=0), SoloRanks()) is None  # rank 0
    # rank 3 = second GPU of the second node: its node's first rank answers for the pod
    assert follower_health(LearnerSettings(local_rank=1), GroupRanks(3, 4, "cpu")) is None
    health = follower_health(LearnerSettings(local_rank=0), GroupRanks(2, 4, "cpu"))
    assert health is not None
    try:
        url = f"http://127.0.0.1:{health.server.port}"
        assert httpx.get(f"{url}/healthz").status_code == 200
        ready = httpx.get(f"{url}/readyz")
        assert (ready.status_code, ready.text.strip()) == (503, "waiting for rank 0")
        health.set_phase(FOLLOWING)
        assert httpx.get(f"{url}/readyz").status_code == 200
        assert 'dapo_learner_rank_ready{rank="2",world="4"} 1.0' in httpx.get(f"{url}/metrics").text
    finally:
        health.stop()


def _start_node(redis_url: str, run_id: str, rdzv_port: int, health_port: int, log: Path):
    """One torchrun agent = one learner pod with one rank (LOCAL_RANK 0)."""
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS="1",
        DAPO_REDIS_URL=redis_url,
        DAPO_RUN_ID=run_id,
        DAPO_HEALTH_PORT=str(health_port),
        DAPO_THREADS="1",
        DAPO_DEVICE="cpu",
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{rdzv_port}",
        "--rdzv_id=rank-health",
        "-m",
        "dapo.cli",
        "service",
        "learner",
    ]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip


def _get(port: int, path: str) -> httpx.Response | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5)
    except httpx.HTTPError:
        return None


def _wait_both_ready(nodes, ports, logs, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for node, log in zip(nodes, logs, strict=True):
            assert node.poll() is None, log.read_text()[-4000:]
        answers = [_get(p, "/readyz") for p in ports]
        if all(a is not None and a.status_code == 200 for a in answers):
            return
        time.sleep(0.5)
    raise AssertionError("learner pods never ready:\n" + logs[1].read_text()[-3000:])


def test_the_pod_without_rank_0_answers_its_probes(tmp_path, redis_url):
    runs = tmp_path / "runs"
    spec = small_spec(
        make_model_dir(tmp_path / "model"), make_dataset(tmp_path / "train.jsonl"), runs
    )
    store = RunStore(redis.Redis.from_url(redis_url))
    run_id = store.create(spec).run_id  # pending: the learner waits, rank 1 with it
    ports, rdzv = (free_port(), free_port()), free_port()
    logs = [tmp_path / f"node-{i}.log" for i in range(2)]
    nodes = [
        _start_node(redis_url, run_id, rdzv, p, log) for p, log in zip(ports, logs, strict=True)
    ]
    try:
        _wait_both_ready(nodes, ports, logs)
        metrics = {p: _get(p, "/metrics").text for p in ports}
        # which node got rank 0 is the rendezvous' choice: tell them apart by what they serve
        (follower,) = [p for p in ports if "dapo_learner_rank_up" in metrics[p]]
        (leader,) = [p for p in ports if 'dapo_up{service="learner"} 1.0' in metrics[p]]
        assert 'dapo_learner_rank_ready{rank="1",world="2"} 1.0' in metrics[follower]
        for _ in range(5):  # rank 1 sits in rank 0's command broadcast all along
            alive = _get(follower, "/healthz")
            assert alive is not None and (alive.status_code, alive.text) == (200, "ok\n")
            time.sleep(0.2)
        assert _get(follower, "/readyz").text.strip() == "following rank 0"
        assert _get(leader, "/healthz").status_code == 200
        store.set_status(run_id, "stopping")  # rank 0 ends the loop and sends stop to rank 1
        codes = [n.wait(timeout=120) for n in nodes]
        assert codes == [0, 0], [log.read_text()[-3000:] for log in logs]
        assert store.state(run_id).status == "stopped"
        assert _get(follower, "/healthz") is None  # the port closed with the rank
    finally:
        for n in nodes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(n.pid, signal.SIGKILL)
