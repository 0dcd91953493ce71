"""The learner's probes as rendered, for one pod and for a multi-node learner: every pod is
probed on the port its rank serves, the start-up probe outlasts torchrun's rendezvous, and
the probed paths are the ones a rank > 0 answers (liveness while it waits on rank 0,
readiness once it follows)."""

from __future__ import annotations

import httpx
import pytest

from services.learner.main import FOLLOWING, LearnerSettings, follower_health
from services.learner.ranks import GroupRanks
from tests.deploy.chart_helpers import container, env_of, port_of, render_with, workload

RENDEZVOUS_JOIN_S = 600
"""torchrun's default rendezvous join timeout: the ranks (and their endpoints) may start
this long after the pod."""


@pytest.fixture(scope="module", params=[(1, 1), (3, 8)], ids=["one-pod", "three-nodes"])
def learner(request) -> tuple[dict, dict]:
    nodes, gpus = request.param
    objs = render_with({"learner": {"nodes": nodes, "gpus": gpus}})
    assert workload(objs, "learner")["spec"]["replicas"] == nodes
    return container(objs, "learner"), {"nodes": nodes, "gpus": gpus}


def test_every_learner_pod_is_probed_on_the_port_its_ranks_serve(learner):
    c, _ = learner
    env = env_of(c)
    settings = LearnerSettings(
        health_port=int(env["DAPO_HEALTH_PORT"]), health_host=env["DAPO_HEALTH_HOST"]
    )
    assert settings.health_host == "0.0.0.0"  # reachable by the kubelet
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] == "metrics", probe
    assert port_of(c, "metrics") == settings.health_port


def test_startup_probe_outlasts_the_rendezvous_and_liveness_tolerates_stalls(learner):
    c, _ = learner
    start, live = c["startupProbe"], c["livenessProbe"]
    assert start["httpGet"]["path"] == "/healthz"
    assert start["periodSeconds"] * start["failureThreshold"] >= RENDEZVOUS_JOIN_S + 120
    # a rank answers from its own thread: a minute of missed answers means a dead process
    assert live["periodSeconds"] * live["failureThreshold"] >= 60


def test_probed_paths_are_answered_by_a_rank_above_0(learner):
    c, _ = learner
    # the first rank of the second node of an 8-GPU-per-node learner
    health = follower_health(LearnerSettings(local_rank=0), GroupRanks(8, 16, "cpu"))
    assert health is not None
    url = f"http://127.0.0.1:{health.server.port}"
    try:
        for probe in ("startupProbe", "livenessProbe"):  # while waiting on rank 0
            assert httpx.get(url + c[probe]["httpGet"]["path"]).status_code == 200, probe
        ready = c["readinessProbe"]["httpGet"]["path"]
        assert httpx.get(url + ready).status_code == 503
        health.set_phase(FOLLOWING)
        assert httpx.get(url + ready).status_code == 200
    finally:
        health.stop()
