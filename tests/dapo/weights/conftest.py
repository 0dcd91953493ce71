"""The `cluster` fixture: spawned rollout workers around the test's learner."""

from __future__ import annotations

import pytest
import torch

from tests.dapo.weights.harness import Cluster


@pytest.fixture
def cluster(redis_url, run_id, tmp_path):
    torch.set_num_threads(1)
    cluster = Cluster(redis_url, run_id, tmp_path)
    yield cluster
    cluster.stop()
