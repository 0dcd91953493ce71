"""The Helm chart in deploy/k8s, rendered and linted for real without a helm binary.

Helm runs as a library through helm-python-sdk (Helm 4's Go SDK behind a C ABI); every rendered
object is validated against the Kubernetes API schemas shipped with kubernetes-validate, and
the objects are checked against the code they run: the CLI's subcommands, the services'
settings classes, and the health and API servers' real routes.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from tests.deploy.chart_helpers import (
    CHART,
    COMPONENTS,
    GOOD_SETS,
    GPU,
    KUBE_VERSIONS,
    NAMESPACE,
    REPO,
    _chart,
    container,
    env_names,
    env_of,
    find,
    one,
    pod_templates,
    port_of,
    render,
    render_files,
    secret_refs,
    selects,
    settings_class,
    values_of,
    workload,
)


# -- Helm lint and Kubernetes schemas ----------------------------------------------
@pytest.mark.parametrize("values", GOOD_SETS)
def test_chart_lints_without_warnings(values):
    kube = f"v{KUBE_VERSIONS[0]}"
    report = helm.lint(
        CHART, values_of(values), strict=True, namespace=NAMESPACE, kube_version=kube
    )
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["total_charts_linted"] == 1
    assert not problems and not report["errors"], problems or report["errors"]


@pytest.mark.parametrize("values", GOOD_SETS)
def test_every_object_matches_the_kubernetes_schemas(values):
    objs = render(values)
    assert len(objs) >= 15
    for obj in objs:
        if obj["apiVersion"] == "monitoring.coreos.com/v1":
            check_operator_object_shape(obj)
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = ".".join(str(p) for p in exc.path)
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} {where}: {exc.message}")


def check_operator_object_shape(obj: dict) -> None:
    """ServiceMonitor and PrometheusRule are CRDs the shipped schemas lack: the fields the
    Prometheus Operator needs (the rules themselves are checked by promtool, test_alerts)."""
    assert obj["metadata"]["name"]
    if obj["kind"] == "PrometheusRule":
        assert set(obj["spec"]) == {"groups"}
        for group in obj["spec"]["groups"]:
            assert group["name"] and group["rules"]
            assert all(set(r) <= {"alert", "expr", "for", "labels", "annotations"}
                       for r in group["rules"])  # fmt: skip
        return
    sm = obj
    assert sm["kind"] == "ServiceMonitor"
    assert set(sm["spec"]) <= {"selector", "namespaceSelector", "endpoints"}
    assert sm["spec"]["selector"]["matchLabels"]
    for ep in sm["spec"]["endpoints"]:
        assert set(ep) <= {"port", "path", "interval", "scrapeTimeout"}
        assert isinstance(ep["port"], str) and ep["path"].startswith("/")


# -- bad values are rejected, naming the field -------------------------------------
@pytest.mark.parametrize(
    ("values", "named"),
    [
        ("bad-negative-replicas", "/rollout/replicas"),
        ("bad-unknown-key", "'gpu'"),
        ({"rollout": {"device": "tpu"}}, "/rollout/device"),
        ({"replicaCount": 3}, "'replicaCount'"),
        ({"healthPort": "9400"}, "/healthPort"),
        ({"redis": {"external": {"url": "redis://:pw@r:6379/0"}}}, "/redis/external/url"),
        ({"redis": {"auth": {"username": "a b"}}}, "/redis/auth/username"),
        ({"redis": {"maxmemory": "3gb"}}, "/redis/maxmemory"),
        ({"api": {"auth": {"token": "t0ken"}}}, "/api/auth/token"),
        ({"monitoring": {"prometheusRule": {"for": {"DapoX": "1m"}}}}, "'DapoX'"),
        ({"networkPolicy": {"ephemeralPorts": {"start": 0, "end": 1}}}, "/start"),
        ({"runConfig": {"trainer": {"runs_dir": "runs"}}}, "/runConfig/trainer/runs_dir"),
        (
            {"rollout": {"resources": {"requests": {"cpu": "1", "memory": "1Gi", GPU: 1}}}},
            "/rollout/resources/requests",
        ),
    ],
)
def test_schema_rejects_bad_values_naming_the_field(values, named):
    values = values_of(values) if isinstance(values, str) else values
    with pytest.raises(helm.HelmValuesError) as err:
        _chart().render(values, name="dapo", namespace=NAMESPACE)
    assert named in str(err.value)
    report = helm.lint(CHART, values, namespace=NAMESPACE)
    assert any(named in e for e in report["errors"]), report["errors"]


# -- the objects agree with the code -----------------------------------------------
@pytest.mark.parametrize("values", GOOD_SETS)
def test_commands_are_the_cli_subcommands(values):
    from dapo.cli.main import build_parser

    objs = render(values)
    for name in COMPONENTS:
        cmd = container(objs, name)["command"]
        if name == "learner":
            # torchrun [launch options] -m dapo.cli service learner
            assert cmd[0] == "torchrun" and cmd[-4:-2] == ["-m", "dapo.cli"]
            args = cmd[-2:]
        else:
            assert cmd[:1] == ["dapo"]
            args = cmd[1:]
        assert args == ["service", name]
        assert build_parser().parse_args(args).name == name


@pytest.mark.parametrize("values", GOOD_SETS)
def test_gpus_only_on_rollout_and_learner(values):
    objs, vals = render(values), _chart().merge_values(values_of(values))
    for tmpl in pod_templates(objs):
        (c,) = tmpl["spec"]["containers"]
        name, res = c["name"], c["resources"]
        assert "cpu" in res["requests"] and "memory" in res["requests"]
        gpus = res["requests"].get(GPU)
        if name in ("rollout", "learner"):
            assert gpus == res["limits"][GPU] == vals[name]["gpus"]
        else:
            assert gpus is None and GPU not in res.get("limits", {})
    cmd = container(objs, "learner")["command"]
    assert f"--nproc_per_node={vals['learner']['gpus']}" in cmd
    assert workload(objs, "rollout")["spec"]["replicas"] == vals["rollout"]["replicas"]
    assert workload(objs, "learner")["spec"]["replicas"] == vals["learner"]["nodes"]


@pytest.mark.parametrize("values", GOOD_SETS)
def test_env_is_read_by_the_settings_classes(values, monkeypatch, tmp_path):
    objs = render(values)
    files = {"DAPO_API_TOKEN_FILE": tmp_path / "token", "DAPO_REDIS_TLS_CA": tmp_path / "ca"}
    for path in files.values():
        path.write_text("chart-test-token-0a9f\n")
    for name in COMPONENTS:
        c, cls = container(objs, name), settings_class(name)
        env = {k: v for k, v in env_of(c).items() if k.startswith("DAPO_")}
        unknown = set(env) - env_names(cls)
        assert not unknown, f"{name}: {sorted(unknown)} are not fields of {cls.__name__}"
        # The values parse: the settings the container would really get (a Secret's value
        # and a mounted file stand in for what the kubelet provides).
        for k in [k for k in os.environ if k.startswith("DAPO_")]:
            monkeypatch.delenv(k)
        for k, v in env.items():
            v = "s3cret" if k in secret_refs(c) else v
            monkeypatch.setenv(k, str(files[k]) if k in files else v)
        s = cls.from_env()
        assert s.redis_url == env_of(container(objs, "api"))["DAPO_REDIS_URL"]
        assert s.redis_password.get_secret_value() == "s3cret"
        assert (s.redis_tls_ca is not None) == s.redis_url.startswith("rediss://")
        if name == "api":
            assert (s.host, s.port) == ("0.0.0.0", port_of(c, "http"))
            assert s.resolved_token() == "chart-test-token-0a9f"
        else:
            assert (s.health_host, s.health_port) == ("0.0.0.0", port_of(c, "metrics"))
            assert s.device == ("cuda" if name in ("rollout", "learner") else "cpu")


def test_learner_publishes_a_reachable_sync_address():
    objs = render(None)
    c, svc = container(objs, "learner"), one(objs, "Service", "learner")
    env, sts = env_of(c), workload(objs, "learner")
    headless = svc["metadata"]["name"]
    assert svc["spec"]["clusterIP"] == "None" and sts["spec"]["serviceName"] == headless
    # $(POD_NAME).<headless>.$(POD_NAMESPACE): the pod's stable DNS name.
    assert env["DAPO_SYNC_HOST"].startswith(f"$(POD_NAME).{headless}.$(POD_NAMESPACE).")
    names = [e["name"] for e in c["env"]]
    assert names.index("POD_NAME") < names.index("DAPO_SYNC_HOST")
    sync = {p["name"]: p["port"] for p in svc["spec"]["ports"]}["weight-sync"]
    assert sync == int(env["DAPO_SYNC_PORT"]) == port_of(c, "weight-sync")


def test_multi_node_learner_and_fixed_reward_replicas():
    objs = render("rollout-replicas")
    assert not find(objs, "HorizontalPodAutoscaler")
    assert workload(objs, "reward")["spec"]["replicas"] == 3
    cmd, svc = container(objs, "learner")["command"], one(objs, "Service", "learner")
    port = {p["name"]: p["port"] for p in svc["spec"]["ports"]}["rendezvous"]
    assert "--nnodes=2" in cmd and "--standalone" not in cmd
    assert f"--rdzv_endpoint=dapo-learner-0.{svc['metadata']['name']}:{port}" in cmd
    assert "--standalone" in container(render(None), "learner")["command"]


def test_probe_paths_are_served_by_the_health_server():
    from prometheus_client import CollectorRegistry

    from dapo.runtime.health import HealthServer

    objs = render("ingress-monitoring")
    paths = {ep["path"] for ep in one(objs, "ServiceMonitor")["spec"]["endpoints"]}
    for name in ("sampler", "reward", "rollout", "learner"):
        c = container(objs, name)
        for probe in ("livenessProbe", "readinessProbe"):
            assert c[probe]["httpGet"]["port"] == "metrics"
            paths.add(c[probe]["httpGet"]["path"])
    assert paths == {"/healthz", "/readyz", "/metrics"}
    server = HealthServer(CollectorRegistry(), lambda: (True, "ready"), "127.0.0.1", 0).start()
    try:
        for path in paths:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=5) as r:
                assert r.status == 200, path
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/nope", timeout=5)
    finally:
        server.stop()


def test_api_serves_its_probes_and_loads_the_run_config(monkeypatch, tmp_path):
    """The API built from the rendered env and ConfigMap: probes and /metrics on the main port."""
    import redis
    from fastapi.testclient import TestClient
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from services.api.app import create_app
    from services.api.settings import ApiSettings

    objs = render(None)
    c = container(objs, "api")
    env = env_of(c)
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(one(objs, "ConfigMap", "api")["data"]["run.yaml"])
    token = tmp_path / "token"
    token.write_text("chart-test-token-0a9f")
    port, host = int(env["DAPO_PORT"]), env["DAPO_HOST"]
    settings = ApiSettings(
        DAPO_API_TOKEN_FILE=token, port=port, host=host, autostart_config=run_yaml
    )
    # Nothing listens on port 1: /readyz must answer 503, not crash or 404.
    client = redis.Redis(port=1, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    app = create_app(settings, client=client)
    http = TestClient(app)
    assert http.get(c["livenessProbe"]["httpGet"]["path"]).status_code == 200
    assert http.get(c["readinessProbe"]["httpGet"]["path"]).status_code == 503
    assert http.get("/metrics").status_code == 200
    assert http.get("/v1/runs").status_code in (401, 403)
    svc = one(objs, "Service", "api")
    assert svc["spec"]["ports"][0]["targetPort"] == "http" and port_of(c, "http") == 8000


def test_run_config_is_a_valid_run_spec_inside_the_volumes():
    from dapo.runtime.config import validate_run_spec

    objs = render(None)
    spec = validate_run_spec(yaml.safe_load(one(objs, "ConfigMap", "api")["data"]["run.yaml"]))
    assert spec.rollout.n == 8  # a bare `n:` key would have become a boolean
    mounts = {m["name"]: m for m in container(objs, "learner")["volumeMounts"]}
    assert spec.trainer.runs_dir.startswith(mounts["checkpoints"]["mountPath"] + "/")
    assert mounts["checkpoints"]["readOnly"] is False and mounts["models"]["readOnly"] is True
    api = container(objs, "api")
    conf = {m["name"]: m["mountPath"] for m in api["volumeMounts"]}["run-config"]
    assert env_of(api)["DAPO_AUTOSTART_CONFIG"] == f"{conf}/run.yaml"


# -- value sets ----------------------------------------------------------------------
def test_default_release_objects():
    objs = render(None)
    assert one(objs, "Service", "redis")["metadata"]["name"] == "dapo-redis"
    redis = container(objs, "redis")
    args = redis["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    (claim,) = workload(objs, "redis")["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in redis["volumeMounts"]
    claims = {p["metadata"]["name"] for p in find(objs, "PersistentVolumeClaim")}
    assert claims == {"dapo-models", "dapo-data", "dapo-checkpoints"}
    sampler = workload(objs, "sampler")["spec"]
    assert sampler["replicas"] == 1 and sampler["strategy"] == {"type": "Recreate"}
    hpa = one(objs, "HorizontalPodAutoscaler", "reward")
    assert hpa["spec"]["scaleTargetRef"]["name"] == workload(objs, "reward")["metadata"]["name"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert "replicas" not in workload(objs, "reward")["spec"]  # the HPA owns it
    assert not find(objs, "Ingress") and not find(objs, "ServiceMonitor")
    assert not find(objs, "PrometheusRule")
    url = "redis://dapo-redis:6379/0"
    assert all(env_of(container(objs, n))["DAPO_REDIS_URL"] == url for n in COMPONENTS)


def test_external_redis_replaces_the_statefulset():
    objs = render("external-redis")
    assert not find(objs, "StatefulSet", "redis") and not find(objs, "Service", "redis")
    url = values_of("external-redis")["redis"]["external"]["url"]
    assert all(env_of(container(objs, n))["DAPO_REDIS_URL"] == url for n in COMPONENTS)
    assert [p["metadata"]["name"] for p in find(objs, "PersistentVolumeClaim")] == [
        "dapo-checkpoints"
    ]
    volumes = workload(objs, "rollout")["spec"]["template"]["spec"]["volumes"]
    (models,) = [v["persistentVolumeClaim"] for v in volumes if v["name"] == "models"]
    assert models["claimName"] == "llm-weights"
    assert "data" not in {m["name"] for m in container(objs, "sampler")["volumeMounts"]}
    # The login comes from the user's Secret; the chart makes none for Redis.
    assert [s["metadata"]["name"] for s in find(objs, "Secret")] == ["dapo-api-token"]
    for name in COMPONENTS:
        refs = secret_refs(container(objs, name))
        assert refs["DAPO_REDIS_PASSWORD"] == ("shared-redis", "redis-password")
    assert "shared-redis" in render_files("external-redis")["NOTES.txt"]


def test_ingress_and_service_monitor():
    objs = render("ingress-monitoring")
    svc = one(objs, "Service", "api")
    rule = one(objs, "Ingress")["spec"]["rules"][0]
    assert rule["host"] == "dapo.rl.example.org"
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": svc["metadata"]["name"], "port": {"name": "http"}}
    assert one(objs, "Ingress")["spec"]["tls"][0]["hosts"] == ["dapo.rl.example.org"]
    sm = one(objs, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    ports = {ep["port"] for ep in sm["spec"]["endpoints"]}
    # Every component has one Service the monitor selects with a port it scrapes.
    for name in COMPONENTS:
        services = [s for s in find(objs, "Service", name) if selects(sm["spec"]["selector"], s)]
        assert [bool(ports & {p["name"] for p in s["spec"]["ports"]}) for s in services] == [True]
    assert not any(selects(sm["spec"]["selector"], s) for s in find(objs, "Service", "redis"))
    secret = workload(objs, "api")["spec"]["template"]["spec"]["volumes"][-1]["secret"]
    assert secret["secretName"] == "dapo-api-credentials"
    assert [s["metadata"]["name"] for s in find(objs, "Secret")] == ["dapo-redis-auth"]
    assert secret["items"] == [{"key": "api-token", "path": "token"}]
    notes = render_files("ingress-monitoring")["NOTES.txt"]
    assert "https://dapo.rl.example.org/" in notes and "dapo-api-credentials" in notes


@pytest.mark.parametrize("values", GOOD_SETS)
def test_pods_run_unprivileged_with_scratch_volumes(values):
    for tmpl in pod_templates(render(values)):
        pod = tmpl["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001
        assert pod["enableServiceLinks"] is False and pod["automountServiceAccountToken"] is False
        empty = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
            assert sc["readOnlyRootFilesystem"] is True
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert mounts["/tmp"] in empty, c["name"]
            if c["name"] != "redis":
                assert mounts["/cache"] in empty and env_of(c)["HOME"] == "/tmp"


def test_dashboard_configmap_follows_the_file(tmp_path):
    shipped = CHART / "grafana-dashboard.json"
    if shipped.is_file():
        text = render_files(None)["dashboard-configmap.yaml"]
        board = json.loads(yaml.safe_load(text)["data"]["dapo.json"])
        assert board == json.loads(shipped.read_text())
        assert len(text.encode()) < 1 << 20  # a ConfigMap holds at most 1 MiB
    chart = tmp_path / "k8s"
    shutil.copytree(CHART, chart)
    (chart / "grafana-dashboard.json").unlink(missing_ok=True)
    assert "grafana_dashboard" not in "".join(render_files(None, chart).values())
    board = {"title": "DAPO", "panels": [{"type": "timeseries", "title": "reward"}]}
    (chart / "grafana-dashboard.json").write_text(json.dumps(board))
    _chart.cache_clear()
    text = render_files(None, chart)["dashboard-configmap.yaml"]
    cm = yaml.safe_load(text)
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["dapo.json"]) == board


def test_images_run_as_the_chart_user():
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        lines = (REPO / "docker" / name).read_text().splitlines()
        final = lines[max(i for i, ln in enumerate(lines) if ln.startswith("FROM ")) :]
        assert "USER 10001:10001" in final, name
        assert 'ENTRYPOINT ["dapo"]' in final, name
