"""The plan of the 32B recipe: figures that follow from the shapes, and its warnings."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from dapo.runtime.config import load_run_spec
from dapo.sizing import ClusterShape, Workload, chart_values, load_model_shape, make_plan
from dapo.sizing.shapes import GIB

SPEC = load_run_spec("configs/dapo-qwen2.5-32b.yaml")
MODEL = load_model_shape(Path(__file__).resolve().parent / "qwen2.5-32b")
P = 32_763_876_352


def plan(**cluster) -> dict:
    return make_plan(SPEC, MODEL, ClusterShape(**cluster))


def test_weights_move_in_the_rollout_dtype_at_the_stated_bandwidth():
    w = plan(bandwidth_gb_s=50)["weights"]
    assert w["update_gib"] * GIB == pytest.approx(2 * P)  # bf16
    assert w["update_s"] == pytest.approx(2 * P / 50e9)


def test_sharded_state_is_16_bytes_a_parameter_over_the_ranks():
    for world in (8, 16):
        g = plan(learner_gpus=world)["learner_gpu"]
        state = (g["params"] + g["grads"] + g["optimizer"]) * GIB
        assert state == pytest.approx(16 * P / world)


def test_checkpointing_keeps_a_fraction_of_the_activations():
    g = plan()["learner_gpu"]
    assert SPEC.model.enable_gradient_checkpointing
    assert g["activations"] == g["activations_checkpointed"] < g["activations_full"] / 10


def test_shorter_answers_need_less_everywhere():
    long = plan()
    short = make_plan(SPEC, MODEL, ClusterShape(), Workload(response_tokens=4096))
    for part, key in (
        ("learner_gpu", "total"),
        ("learner_host", "node"),
        ("redis", "data"),
        ("rollout_gpu", "kv_cache"),
    ):
        assert short[part][key] < long[part][key], part


def test_warnings_say_what_does_not_fit():
    said = " ".join(plan()["warnings"])
    assert "learner GPU needs" in said  # 8 x 80 GiB at 20k-token answers
    assert "max_entry_bytes" not in said  # a batch travels as a reference to its groups
    assert "rollout GPU holds the KV cache of" in said
    roomy = plan(learner_gpus=64, learner_nodes=8, gpu_memory_gib=1000)
    assert not any("learner GPU" in w for w in roomy["warnings"])


def test_no_entry_of_the_32b_recipe_nears_the_bound_and_a_huge_group_is_told():
    red = plan()["redis"]
    assert red["entry_mib.batches"] < 0.1  # 512 groups by reference
    assert max(v for k, v in red.items() if k.startswith("entry_mib.")) < 64 / 16
    # 16 answers of 600k tokens: one scored group alone is over the bus's bound
    huge = make_plan(SPEC, MODEL, ClusterShape(), Workload(response_tokens=600_000))
    said = " ".join(huge["warnings"])
    assert "one scored entry is" in said and "max_entry_bytes (64 MiB" in said


def test_chart_values_round_the_plan_up():
    cluster = ClusterShape(
        learner_gpus=16, learner_nodes=2, rollout_gpus=16, tensor_parallel_size=4
    )
    p = make_plan(SPEC, MODEL, cluster)
    v = chart_values(p, cluster)
    assert v["redis"]["maxmemory"] == f"{math.ceil(p['redis']['maxmemory'])}Gi"
    assert int(v["redis"]["maxmemory"][:-2]) >= p["redis"]["data"]
    assert int(v["redis"]["resources"]["limits"]["memory"][:-2]) > int(v["redis"]["maxmemory"][:-2])
    assert v["learner"] | {"resources": None} == {"nodes": 2, "gpus": 8, "resources": None}
    assert (v["rollout"]["replicas"], v["rollout"]["gpus"]) == (4, 4)


def test_bad_workload_is_named():
    with pytest.raises(ValidationError, match="keep_rate"):
        Workload(keep_rate=0)
