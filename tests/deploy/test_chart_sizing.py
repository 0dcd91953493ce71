"""The chart's values for the 32B recipe follow ``dapo plan``: the value set
tests/deploy/values/qwen2.5-32b.yaml states the plan command it follows in its header;
this runs that command and compares, then renders, lints and validates the set like the
other value sets, and checks that its run spec is the planned one."""

from __future__ import annotations

import contextlib
import io
import shlex

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from dapo.cli.main import main
from dapo.runtime.config import load_run_spec
from proto.runspec import RunSpec
from tests.deploy.chart_helpers import (
    CHART,
    KUBE_VERSIONS,
    NAMESPACE,
    VALUES,
    container,
    env_of,
    render,
    values_of,
    workload,
)

SET = "qwen2.5-32b"
PATHS = [
    "model.path=/models/Qwen2.5-32B",
    "data.train_files=[/data/dapo-math-17k.parquet]",
    "data.val_files=[/data/aime-2024.parquet]",
    "trainer.runs_dir=/checkpoints/runs",
]


def plan_command() -> list[str]:
    """The ``dapo plan`` arguments the value set's header names."""
    (line,) = [
        x for x in (VALUES / f"{SET}.yaml").read_text().splitlines() if x.startswith("# dapo plan ")
    ]
    return shlex.split(line.removeprefix("# dapo "))


def planned_values() -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*plan_command(), "--values"]) == 0
    return yaml.safe_load(out.getvalue())


def subset_mismatches(expected, actual, where: str = "") -> list[str]:
    """Where ``actual`` differs from ``expected`` (every key of expected, recursively)."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{where}: {actual!r} is not a mapping"]
        return [
            m
            for k, v in expected.items()
            for m in subset_mismatches(v, actual.get(k), f"{where}.{k}")
        ]
    return [] if expected == actual else [f"{where}: plan {expected!r}, file {actual!r}"]


def test_value_set_equals_the_plan():
    planned = planned_values()
    assert planned["redis"]["maxmemory"] and planned["learner"]["resources"]
    assert subset_mismatches(planned, values_of(SET)) == []


def test_value_set_runs_the_planned_spec():
    args = plan_command()
    config = args[args.index("--config") + 1]
    assert RunSpec.model_validate(values_of(SET)["runConfig"]) == load_run_spec(config, PATHS)


def test_value_set_lints_and_matches_the_kubernetes_schemas():
    kube = f"v{KUBE_VERSIONS[0]}"
    report = helm.lint(CHART, values_of(SET), strict=True, namespace=NAMESPACE, kube_version=kube)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], problems or report["errors"]
    for obj in render(SET):
        if obj["apiVersion"] == "monitoring.coreos.com/v1":
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message}")


def test_rendered_objects_carry_the_planned_sizes():
    objs, planned = render(SET), planned_values()
    args = container(objs, "redis")["args"]
    flags = dict(zip(args[::2], args[1::2], strict=True))
    gib = int(planned["redis"]["maxmemory"].removesuffix("Gi"))
    assert int(flags["--maxmemory"]) == gib << 30
    redis_limits = container(objs, "redis")["resources"]["limits"]
    assert redis_limits["memory"] == planned["redis"]["resources"]["limits"]["memory"]
    (claim,) = workload(objs, "redis")["spec"]["volumeClaimTemplates"]
    assert (
        claim["spec"]["resources"]["requests"]["storage"] == planned["redis"]["persistence"]["size"]
    )
    learner = workload(objs, "learner")
    assert learner["spec"]["replicas"] == planned["learner"]["nodes"]
    limits = container(objs, "learner")["resources"]["limits"]
    assert limits["memory"] == planned["learner"]["resources"]["limits"]["memory"]
    assert limits["nvidia.com/gpu"] == planned["learner"]["gpus"]
    rollout = container(objs, "rollout")
    assert workload(objs, "rollout")["spec"]["replicas"] == planned["rollout"]["replicas"]
    assert rollout["resources"]["limits"]["nvidia.com/gpu"] == planned["rollout"]["gpus"]
    assert env_of(rollout)["DAPO_VLLM_TENSOR_PARALLEL_SIZE"] == str(planned["rollout"]["gpus"])
