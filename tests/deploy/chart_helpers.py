"""Rendering the Helm chart in deploy/k8s and finding its objects, shared by the chart tests.

Helm runs as a library through helm-python-sdk; ``render`` gives the parsed objects of a
values file of tests/deploy/values (None = the defaults), ``render_with`` of a values dict.
"""

from __future__ import annotations

import functools
import importlib
import json
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "k8s"
VALUES = Path(__file__).resolve().parent / "values"
RELEASE, NAMESPACE = "dapo", "rl"
# The chart's kubeVersion floor and the newest schemas kubernetes-validate ships.
KUBE_VERSIONS = ("1.28.0", kubernetes_validate.latest_version())
GOOD_SETS = (
    None,
    "external-redis",
    "rollout-replicas",
    "ingress-monitoring",
    "redis-acl-tls",
    "qwen2.5-32b",
)
COMPONENTS = ("sampler", "reward", "rollout", "learner", "api")
SETTINGS = {
    "sampler": "services.sampler.main:SamplerSettings",
    "reward": "services.reward.main:RewardSettings",
    "rollout": "services.rollout.main:RolloutSettings",
    "learner": "services.learner.main:LearnerSettings",
    "api": "services.api.settings:ApiSettings",
}
GPU = "nvidia.com/gpu"


# -- rendering ---------------------------------------------------------------------
def values_of(name: str | None) -> dict:
    """A values file parsed by Helm's own YAML reader (YAML 1.1 quirks included)."""
    if name is None:
        return {}
    return helm.values_from_yaml((VALUES / f"{name}.yaml").read_text())


@functools.cache
def _chart(path: str = str(CHART)) -> helm.Chart:
    return helm.Chart.load(path)


def render_files(name: str | None, chart: Path = CHART) -> dict[str, str]:
    """Template path -> rendered text, as `helm template` with that values file would give."""
    out = _chart(str(chart)).render(
        values_of(name), name=RELEASE, namespace=NAMESPACE, is_install=True
    )
    return {path.split("/templates/", 1)[1]: text for path, text in out.items()}


def _objects(files: dict[str, str]) -> tuple[dict, ...]:
    objs = []
    for path, text in sorted(files.items()):
        if path.endswith(".yaml"):
            objs.extend(o for o in yaml.safe_load_all(text) if o)
    return tuple(objs)


@functools.cache
def render(name: str | None) -> tuple[dict, ...]:
    return _objects(render_files(name))


def render_with(values: dict) -> tuple[dict, ...]:
    """The objects of a values dict (merged over the defaults, as `helm --set` would)."""
    return _objects(_rendered(json.dumps(values, sort_keys=True)))


@functools.cache
def _rendered(values_json: str) -> dict[str, str]:
    out = _chart().render(json.loads(values_json), name=RELEASE, namespace=NAMESPACE)
    return {path.split("/templates/", 1)[1]: text for path, text in out.items()}


def component_of(obj: dict) -> str | None:
    return obj["metadata"]["labels"].get("app.kubernetes.io/component")


def find(objs, kind: str, component: str | None = None) -> list[dict]:
    return [o for o in objs if o["kind"] == kind and component in (None, component_of(o))]


def one(objs, kind: str, component: str | None = None) -> dict:
    found = find(objs, kind, component)
    assert len(found) == 1, f"{kind} of {component}: {len(found)} objects"
    return found[0]


def workload(objs, component: str) -> dict:
    kind = "StatefulSet" if component in ("learner", "redis") else "Deployment"
    return one(objs, kind, component)


def container(objs, component: str) -> dict:
    (c,) = workload(objs, component)["spec"]["template"]["spec"]["containers"]
    return c


def pod_templates(objs) -> list[dict]:
    return [o["spec"]["template"] for o in objs if o["kind"] in ("Deployment", "StatefulSet")]


def env_of(c: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in c.get("env", [])}


def secret_refs(c: dict) -> dict[str, tuple[str, str]]:
    """Env name -> (Secret, key) of the container's variables read from a Secret."""
    return {
        e["name"]: (ref["name"], ref["key"])
        for e in c.get("env", [])
        if (ref := e.get("valueFrom", {}).get("secretKeyRef"))
    }


def port_of(c: dict, name: str) -> int:
    (port,) = [p["containerPort"] for p in c["ports"] if p["name"] == name]
    return port


def settings_class(component: str):
    module, name = SETTINGS[component].split(":")
    return getattr(importlib.import_module(module), name)


def env_names(cls) -> set[str]:
    """The environment variables a settings class reads: DAPO_<FIELD> or the field's alias,
    and those of a nested settings class with its own prefix (DAPO_VLLM_<FIELD>)."""
    names = set()
    for field, info in cls.model_fields.items():
        alias = info.validation_alias
        names.add(alias.upper() if isinstance(alias, str) else f"DAPO_{field.upper()}")
        prefix = getattr(info.annotation, "model_config", {}).get("env_prefix")
        if prefix:
            names |= {f"{prefix}{sub.upper()}" for sub in info.annotation.model_fields}
    return names


def selects(selector: dict, obj: dict) -> bool:
    """Kubernetes label-selector semantics (matchLabels + In/NotIn expressions)."""
    labels = obj["metadata"]["labels"]
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        inside = labels.get(expr["key"]) in expr["values"]
        if inside != (expr["operator"] == "In"):
            return False
    return True
