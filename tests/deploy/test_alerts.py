"""The watchdog alerts: deploy/k8s/alerts/dapo-rules.yaml checked and unit-tested by promtool
(dapo-rules.test.yaml), shipped unchanged by the chart's PrometheusRule except for the `for`
of each rule, which the values set."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import yaml

from tests.deploy.chart_helpers import CHART, REPO, _chart, find, one, render, values_of

RULES = CHART / "alerts" / "dapo-rules.yaml"
RULE_TESTS = CHART / "alerts" / "dapo-rules.test.yaml"


def promtool() -> str:
    found = shutil.which("promtool")
    if found:
        return found
    if os.environ.get("CI") == "true":
        pytest.fail("CI must have promtool installed (.ci/run installs Debian's prometheus)")
    pytest.skip("no promtool on PATH (apt-get install prometheus); CI always has one")


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def test_promtool_checks_the_rules():
    out = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules())} rules found" in out.stdout


def test_promtool_unit_tests_pass():
    out = subprocess.run(
        [promtool(), "test", "rules", RULE_TESTS.name],
        cwd=RULE_TESTS.parent,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert tested == {r["alert"] for r in rules()}, "every alert has unit tests"


def test_the_values_name_every_alert_and_default_to_the_file():
    """The file's `for` are the chart's defaults, so promtool tests what ships by default."""
    defaults = _chart().merge_values({})["monitoring"]["prometheusRule"]
    assert defaults["enabled"] is False  # needs the operator's CRDs, like the ServiceMonitor
    assert defaults["for"] == {r["alert"]: r["for"] for r in rules()}


def test_the_prometheus_rule_ships_the_file_with_the_values_for():
    assert not find(render(None), "PrometheusRule")
    objs = render("ingress-monitoring")
    pr = one(objs, "PrometheusRule")
    assert pr["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    overrides = values_of("ingress-monitoring")["monitoring"]["prometheusRule"]["for"]
    expected = yaml.safe_load(RULES.read_text())["groups"]
    for group in expected:
        for rule in group["rules"]:
            rule["for"] = overrides.get(rule["alert"], rule["for"])
    assert pr["spec"]["groups"] == expected
    assert overrides == {"DapoTrainingStalled": "45m"}


def test_every_series_of_the_rules_is_exported_by_the_code():
    names = set(re.findall(r"\bdapo_[a-z_]+", " ".join(r["expr"] for r in rules())))
    assert "dapo_last_progress_timestamp_seconds" in names
    sources = [p.read_text() for root in ("dapo", "services") for p in (REPO / root).rglob("*.py")]
    for name in names:
        assert any(f'"{name}"' in text for text in sources), f"{name} is exported nowhere"
