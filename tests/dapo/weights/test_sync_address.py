"""Addresses read from Redis are validated before a rollout worker uses them: the learner's
weight-sync store (DAPO_SYNC_ALLOWED_HOSTS) and the newest checkpoint (inside the run's
checkpoints). Whoever can write Redis must not be able to point workers elsewhere."""

from __future__ import annotations

import json
import types

import pytest
import redis

from dapo.weights.receiver import WeightReceiver
from dapo.weights.registry import (
    AddressRefused,
    check_checkpoint_dir,
    check_sync_address,
    latest_checkpoint,
    needs_checkpoint,
    publish_checkpoint,
)
from dapo.weights.sender import WeightSender
from proto.runspec import RunSpec
from services.rollout.main import RolloutSettings, checkpoint_root, start_weights
from tests.dapo.weights.harness import make_model

HEADLESS = ".dapo-learner-headless.rl.svc.cluster.local"


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("dapo-learner-0" + HEADLESS, (HEADLESS,)),
        ("DAPO-LEARNER-1" + HEADLESS + ".", (HEADLESS,)),
        ("learner.local", ("learner.local", "10.0.0.1")),
        ("10.0.0.1", ("learner.local", "10.0.0.1")),
        ("::1", ()),
        ("127.0.0.1", ()),
        ("localhost", ()),
    ],
)
def test_allowed_sync_addresses(host, allowed):
    name, port = check_sync_address(host, "29500", allowed)
    assert port == 29500 and name == host.lower().rstrip(".")


@pytest.mark.parametrize(
    ("host", "port", "allowed", "says"),
    [
        ("evil.example.com", 29500, (HEADLESS,), "not allowed"),
        (HEADLESS[1:], 29500, (HEADLESS,), "not allowed"),  # the suffix alone is no pod
        ("x" + HEADLESS[1:], 29500, (HEADLESS,), "not allowed"),  # xdapo-learner-headless...
        ("dapo-learner-0" + HEADLESS + ".evil.com", 29500, (HEADLESS,), "not allowed"),
        ("10.0.0.2", 29500, ("10.0.0.1",), "not allowed"),
        ("192.0.2.5", 29500, (), "empty = loopback only"),
        ("", 29500, (), "not allowed"),
        ("127.0.0.1", 0, (), "not a TCP port"),
        ("127.0.0.1", "29500; rm", (), "not a TCP port"),
        ("127.0.0.1", 70000, (), "not a TCP port"),
    ],
)
def test_refused_sync_addresses(host, port, allowed, says):
    with pytest.raises(AddressRefused, match=says):
        check_sync_address(host, port, allowed)


def test_settings_parse_the_allowed_hosts():
    settings = RolloutSettings(sync_allowed_hosts=f" {HEADLESS}, 10.0.0.1 ,,fd00::2")
    assert settings.allowed_hosts() == (HEADLESS, "10.0.0.1", "fd00::2")
    assert RolloutSettings().allowed_hosts() == ()
    with pytest.raises(ValueError, match="is not a host"):
        RolloutSettings(sync_allowed_hosts="learner:29500/x")


def test_a_receiver_refuses_a_foreign_store_address(redis_url, run_id):
    """At join, and when a 'restarted learner' written into Redis names another host."""
    client = redis.Redis.from_url(redis_url)
    params = list(make_model().named_parameters())
    sender = WeightSender(client, run_id, params, timeout_s=5)
    try:
        client.hset(sender.keys.rendezvous, "host", "evil.example.com")
        receiver = WeightReceiver(client, run_id, "w-0", params, print)
        with pytest.raises(AddressRefused, match="'evil.example.com'.*not allowed"):
            receiver.join(wait_s=2)
        receiver.close()
        client.hset(sender.keys.rendezvous, "host", "127.0.0.1")
        receiver = WeightReceiver(client, run_id, "w-0", params, print)
        receiver.join(wait_s=2)
        forged = {"incarnation": "forged", "update": 1, "generation": 1, "version": 9,
                  "members": ["w-0"], "fingerprint": receiver.layout.fingerprint}  # fmt: skip
        client.hset(
            sender.keys.rendezvous,
            mapping={"incarnation": "forged", "host": "10.66.6.6", "pending_update": 1,
                     "pending_version": 9, "plan": json.dumps(forged)},
        )  # fmt: skip
        with pytest.raises(AddressRefused, match="'10.66.6.6'"):
            receiver.poll()
        assert receiver.version == -1 and receiver.group is None  # nothing connected, loaded
        receiver.close()
    finally:
        sender.close()


def test_checkpoint_dirs_must_lie_inside_the_runs_checkpoints(tmp_path):
    root = tmp_path / "runs" / "r1" / "checkpoints"
    (root / "step_000010").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (root / "step_000020").symlink_to(tmp_path / "elsewhere")
    (root / "step_000030").symlink_to(root / "step_000010")  # a link that stays inside
    assert check_checkpoint_dir(str(root / "step_000010"), root) == root / "step_000010"
    assert check_checkpoint_dir(str(root / "step_000030"), root) == root / "step_000010"
    refused = {
        str(root / ".." / ".." / "r2" / "checkpoints" / "step_1"): "contains '..'",
        str(root / "step_000020"): "outside the run's checkpoints",
        str(tmp_path / "elsewhere"): "outside the run's checkpoints",
        "/etc": "outside the run's checkpoints",
        str(root): "outside the run's checkpoints",
        str(tmp_path / "runs" / "r1" / "checkpoints-evil"): "outside the run's checkpoints",
    }
    for path, says in refused.items():
        with pytest.raises(AddressRefused, match=says):
            check_checkpoint_dir(path, root)


def test_a_late_worker_loads_only_a_checkpoint_of_its_run(redis_url, run_id, tmp_path):
    client = redis.Redis.from_url(redis_url)
    spec = RunSpec.model_validate({"trainer": {"runs_dir": str(tmp_path)}})
    root = checkpoint_root(spec, run_id)
    good = root / "step_000004"
    good.mkdir(parents=True)
    rt = types.SimpleNamespace(client=client, ctx=types.SimpleNamespace(run_id=run_id, spec=spec))
    model_dir = tmp_path / "base"
    assert start_weights(rt, model_dir) == (model_dir, 0)  # nothing announced yet
    publish_checkpoint(client, run_id, 4, str(good))
    assert start_weights(rt, model_dir) == (good, 4)
    publish_checkpoint(client, run_id, 5, str(tmp_path / "other-run" / "checkpoints" / "s"))
    with pytest.raises(AddressRefused, match="outside the run's checkpoints"):
        start_weights(rt, model_dir)
    with pytest.raises(AddressRefused):
        needs_checkpoint(client, run_id, 0, root)
    assert latest_checkpoint(client, run_id).version == 5  # unchecked without a root
