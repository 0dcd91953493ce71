"""Who may reach what: the rendered NetworkPolicy objects evaluated with Kubernetes' rules
(no cluster), and the one weight-sync address rollout pods accept from Redis."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

import pytest

from dapo.weights.registry import AddressRefused, check_sync_address
from services.rollout.main import RolloutSettings
from tests.deploy.chart_helpers import (
    NAMESPACE,
    container,
    env_of,
    find,
    pod_templates,
    render,
    selects,
)

DNS_NS = {"kubernetes.io/metadata.name": "kube-system"}


@dataclass(frozen=True)
class Peer:
    """A sender or receiver of traffic: a pod (namespace and labels) or a bare address."""

    name: str
    namespace: str | None = None
    labels: dict = field(default_factory=dict, hash=False)
    ip: str = "10.1.2.3"

    @property
    def ns_labels(self) -> dict:
        return {"kubernetes.io/metadata.name": self.namespace}


def pods(objs) -> dict[str, Peer]:
    """The release's pods by component, and a few outsiders."""
    found = {
        t["metadata"]["labels"]["app.kubernetes.io/component"]: Peer(
            t["metadata"]["labels"]["app.kubernetes.io/component"],
            NAMESPACE,
            t["metadata"]["labels"],
        )
        for t in pod_templates(objs)
    }
    found["stranger"] = Peer("stranger", NAMESPACE, {"app": "debug"})
    found["other-ns"] = Peer("other-ns", "team-b", {"app.kubernetes.io/component": "rollout"})
    found["monitoring"] = Peer("monitoring", "monitoring", {"app.kubernetes.io/name": "prometheus"})
    found["dns"] = Peer("dns", "kube-system", {"k8s-app": "kube-dns"})
    found["internet"] = Peer("internet", ip="203.0.113.9")
    return found


def _peer_matches(rule_peer: dict, peer: Peer, policy_ns: str) -> bool:
    if "ipBlock" in rule_peer:
        block = rule_peer["ipBlock"]
        ip = ipaddress.ip_address(peer.ip)
        return ip in ipaddress.ip_network(block["cidr"]) and not any(
            ip in ipaddress.ip_network(e) for e in block.get("except", [])
        )
    if peer.namespace is None:
        return False
    ns_sel, pod_sel = rule_peer.get("namespaceSelector"), rule_peer.get("podSelector")
    in_ns = peer.namespace == policy_ns if ns_sel is None else labels_match(ns_sel, peer.ns_labels)
    return in_ns and (pod_sel is None or labels_match(pod_sel, peer.labels))


def labels_match(selector: dict, labels: dict) -> bool:
    return selects(selector, {"metadata": {"labels": labels}})


def _port_matches(rule: dict, port: int, protocol: str) -> bool:
    if "ports" not in rule:
        return True
    for p in rule["ports"]:
        assert isinstance(p.get("port", 0), int), "policies use port numbers"
        low = p.get("port", 1)
        high = p.get("endPort", low if "port" in p else 65535)
        if p.get("protocol", "TCP") == protocol and low <= port <= high:
            return True
    return False


def _side_allows(objs, pod: Peer, other: Peer, port: int, protocol: str, way: str) -> bool:
    """Whether the policies selecting ``pod`` let traffic of direction ``way`` through."""
    kind, peers_key = ("Ingress", "from") if way == "ingress" else ("Egress", "to")
    if pod.namespace is None:
        return True
    policies = [
        p
        for p in find(objs, "NetworkPolicy")
        if NAMESPACE == pod.namespace
        and kind in p["spec"]["policyTypes"]
        and labels_match(p["spec"]["podSelector"], pod.labels)
    ]
    if not policies:
        return True  # not isolated
    return any(
        _port_matches(rule, port, protocol)
        and (peers_key not in rule or any(_peer_matches(x, other, NAMESPACE) for x in rule[peers_key]))
        for p in policies
        for rule in p["spec"].get(way, [])
    )  # fmt: skip


def reaches(objs, src: Peer, dst: Peer, port: int, protocol: str = "TCP") -> bool:
    """Traffic passes when the sender's egress and the receiver's ingress both allow it."""
    return _side_allows(objs, src, dst, port, protocol, "egress") and _side_allows(
        objs, dst, src, port, protocol, "ingress"
    )


EPHEMERAL = 45000
WORKERS = ("sampler", "reward", "rollout", "learner")


@pytest.mark.parametrize("values", [None, "rollout-replicas", "ingress-monitoring"])
def test_every_pod_has_its_own_policy(values):
    objs = render(values)
    policies = find(objs, "NetworkPolicy")
    for name, pod in pods(objs).items():
        if pod.namespace != NAMESPACE or name == "stranger":
            continue
        chosen = [p for p in policies if labels_match(p["spec"]["podSelector"], pod.labels)]
        assert [p["metadata"]["name"] for p in chosen] == [f"dapo-{name}"]
        assert chosen[0]["spec"]["policyTypes"] == ["Ingress", "Egress"]


def test_who_reaches_what_in_the_default_release():
    objs = render(None)
    p = pods(objs)
    allowed = {
        ("redis", 6379): {"sampler", "reward", "rollout", "learner", "api"},
        ("learner", 29500): {"rollout", "learner"},  # the weight-sync store; ranks: any port
        ("learner", 29400): {"learner"},  # torchrun's rendezvous
        ("learner", EPHEMERAL): {"rollout", "learner"},  # collectives, torchrun's store, NCCL
        ("rollout", EPHEMERAL): {"rollout", "learner"},  # the weight-sync group
        ("rollout", 29500): set(),
        ("sampler", EPHEMERAL): set(),
        ("reward", EPHEMERAL): set(),
        # Anyone outside the release (clients, the ingress controller, Prometheus); the
        # release's own pods have no business there, their egress stops them.
        ("api", 8000): {"stranger", "other-ns", "monitoring", "dns", "internet"},
    }
    allowed |= {(w, 9400): {"monitoring"} for w in WORKERS}
    allowed["learner", 9400].add("learner")  # its ranks reach each other on any port
    for (dst, port), sources in allowed.items():
        got = {name for name, src in p.items() if reaches(objs, src, p[dst], port)}
        assert got == sources, f"{dst}:{port}"


def test_egress_is_dns_redis_and_the_sync_peers():
    objs = render(None)
    p = pods(objs)
    for name in (*WORKERS, "api"):
        assert reaches(objs, p[name], p["dns"], 53, "UDP"), name
        assert not reaches(objs, p[name], p["internet"], 443), name
        assert not reaches(objs, p[name], p["other-ns"], EPHEMERAL), name
    assert not any(reaches(objs, p["redis"], p[x], 53, "UDP") for x in ("dns", "internet"))
    assert reaches(objs, p["learner"], p["learner"], 29400)
    assert not reaches(objs, p["sampler"], p["learner"], 29500)


def test_external_redis_and_custom_prometheus():
    objs = render("external-redis")
    p = pods(objs)
    inside, outside = Peer("redis", ip="10.20.1.5"), Peer("redis", ip="10.99.0.1")
    for name in (*WORKERS, "api"):
        assert reaches(objs, p[name], inside, 6380), name
        assert not reaches(objs, p[name], inside, 6379) and not reaches(
            objs, p[name], outside, 6380
        )
    objs = render("ingress-monitoring")
    p = pods(objs)
    prometheus = Peer("prom", "observability", {"app.kubernetes.io/name": "prometheus"})
    other = Peer("grafana", "observability", {"app.kubernetes.io/name": "grafana"})
    for name in WORKERS:
        assert reaches(objs, prometheus, p[name], 9400)
        assert not reaches(objs, other, p[name], 9400)
        assert not reaches(objs, p["monitoring"], p[name], 9400)


@pytest.mark.parametrize("values", [None, "rollout-replicas"])
def test_rollouts_accept_exactly_the_learners_sync_address(values):
    objs = render(values)
    learner, rollout = env_of(container(objs, "learner")), env_of(container(objs, "rollout"))
    allowed = RolloutSettings(sync_allowed_hosts=rollout["DAPO_SYNC_ALLOWED_HOSTS"]).allowed_hosts()
    nodes = next(o for o in objs if o["kind"] == "StatefulSet" and o["metadata"]["name"] == "dapo-learner")["spec"]["replicas"]  # fmt: skip
    for rank in range(nodes):  # what the kubelet makes of $(POD_NAME) and $(POD_NAMESPACE)
        host = learner["DAPO_SYNC_HOST"].replace("$(POD_NAME)", f"dapo-learner-{rank}")
        host = host.replace("$(POD_NAMESPACE)", NAMESPACE)
        assert check_sync_address(host, learner["DAPO_SYNC_PORT"], allowed)[0] == host
    for foreign in (
        "evil.example.com",
        "dapo-learner-0.dapo-learner-headless.team-b.svc.cluster.local",
        "dapo-learner-headless.rl.svc.cluster.local.evil.example.com",
        "10.0.0.7",
        "127.0.0.1",
    ):
        with pytest.raises(AddressRefused, match="DAPO_SYNC_ALLOWED_HOSTS"):
            check_sync_address(foreign, 29500, allowed)
