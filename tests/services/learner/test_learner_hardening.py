"""The learner loop on the real Redis bus: exactly-once training across a crash (a batch is
acknowledged only once a checkpoint holds it, and a batch delivered again in the same life
is neither trained nor acknowledged early), poison batches set aside, and a full
checkpoint disk (a real small tmpfs) survived by pruning, or failing the run clearly."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import redis

from dapo.runtime.runs import RunStore
from dapo.transport.redis_bus import RedisBus
from services.learner.checkpoint import newest_checkpoint
from services.learner.service import (
    CheckpointDiskFull,
    append_line,
    drop_torn_line,
)
from tests.e2e_helpers import make_dataset, make_model_dir, metrics_lines, small_spec
from tests.services.learner.test_service import batch, publish_batch, start_learner, train_next


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("model"))


def new_run(redis_url, model_dir, tmp_path, runs: Path, total=4, save_freq=2):
    trainer = {"total_training_steps": total, "save_freq": save_freq, "runs_dir": str(runs)}
    spec = small_spec(model_dir, make_dataset(tmp_path / "d.jsonl"), runs, trainer=trainer)
    client = redis.Redis.from_url(redis_url)
    store = RunStore(client)
    run_id = store.create(spec).run_id
    store.set_status(run_id, "running")
    return spec, store, run_id


def pending_ids(bus: RedisBus) -> list[str]:
    rows = bus.client.xpending_range(bus.key("batches"), "learner", "-", "+", 100)
    return [r["message_id"].decode() for r in rows]


def test_a_resumed_learner_never_acks_a_batch_before_a_checkpoint_holds_it(
    redis_url, model_dir, tmp_path
):
    spec, store, run_id = new_run(redis_url, model_dir, tmp_path, tmp_path / "runs", total=6)
    bus = RedisBus(store.client, run_id)
    ids = [publish_batch(bus, batch(run_id, i)) for i in range(3)]
    first = start_learner(spec, store, bus)
    for _ in range(3):  # batches 0, 1 (checkpoint at step 2), 2 (held) ... then a crash
        train_next(first)
    assert pending_ids(bus) == [ids[2]]

    second = start_learner(spec, store, RedisBus(store.client, run_id))  # same consumer name
    assert second.step == 2
    assert train_next(second).batch_id == 2  # the checkpoint did not hold it: trained again
    assert pending_ids(bus) == [ids[2]]  # ... and held, not acknowledged
    # the sampler sends batch 2 once more (its idempotency key was lost with Redis' last
    # second): neither trained again nor acknowledged before a checkpoint holds it
    again = publish_batch(bus, batch(run_id, 2))
    assert train_next(second).batch_id == 2 and second.step == 3
    assert pending_ids(bus) == [ids[2], again]
    three = publish_batch(bus, batch(run_id, 3))
    assert train_next(second).batch_id == 3 and second.step == 4  # checkpoint at step 4
    assert pending_ids(bus) == []
    # its own pending list was handed out once: nothing comes back in this life
    assert bus.consume("batches", "learner", "learner-0", count=1, block_ms=10,
                       reclaim=False) == []  # fmt: skip
    run_dir = Path(spec.trainer.runs_dir) / run_id
    assert [r["batch_id"] for r in metrics_lines(run_dir)] == [0, 1, 2, 2, 3]  # once per life
    assert newest_checkpoint(run_dir / "checkpoints").name == "step_000004"
    assert three and second.policy.version == 4


def test_a_batch_of_another_run_is_dead_lettered_and_training_goes_on(
    redis_url, model_dir, tmp_path
):
    spec, store, run_id = new_run(redis_url, model_dir, tmp_path, tmp_path / "runs", total=2)
    bus = RedisBus(store.client, run_id)
    publish_batch(bus, batch("someone-else", 0))
    publish_batch(bus, batch(run_id, 0))
    loop = start_learner(spec, store, bus)
    train_next(loop)
    assert loop.step == 0 and bus.dead_count("batches") == 1
    assert train_next(loop).batch_id == 0 and loop.step == 1


@pytest.fixture
def small_disk(tmp_path):
    """``small_disk(size)``: a fresh tmpfs of ``size`` mounted in ``tmp_path``."""
    mounted = []

    def mount(size: str) -> Path:
        path = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def fill(disk: Path, leave: int) -> None:
    """Fill ``disk`` until about ``leave`` bytes are free."""
    free = shutil.disk_usage(disk).free
    with (disk / "filler").open("ab") as f:
        f.write(b"\0" * max(free - leave, 0))


def test_a_full_checkpoint_disk_prunes_old_checkpoints_and_saves(
    redis_url, model_dir, tmp_path, small_disk
):
    runs = small_disk("8m")
    spec, store, run_id = new_run(redis_url, model_dir, tmp_path, runs, total=3, save_freq=1)
    bus = RedisBus(store.client, run_id)
    for i in range(3):
        publish_batch(bus, batch(run_id, i))
    loop = start_learner(spec, store, bus)
    train_next(loop)
    train_next(loop)
    ckpts = runs / run_id / "checkpoints"
    size = checkpoint_bytes(ckpts / "step_000002")
    assert size < (8 << 20) // 4, "the tiny model's checkpoint should fit several times"
    # the disk now has room for the metrics line, not for one more checkpoint
    fill(runs, leave=size // 2)
    train_next(loop)  # step 3: ENOSPC, pruned to step 2, saved
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000002", "step_000003"] or sorted(
        p.name for p in ckpts.iterdir()
    ) == ["step_000003"]
    assert newest_checkpoint(ckpts).name == "step_000003"
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".tmp")]
    assert store.state(run_id).status == "running" and bus.lag("batches")["learner"].pending == 0
    assert [r["batch_id"] for r in metrics_lines(runs / run_id)] == [0, 1, 2]


def test_no_room_even_after_pruning_fails_the_run_with_the_reason(
    redis_url, model_dir, tmp_path, small_disk
):
    runs = small_disk("8m")
    spec, store, run_id = new_run(redis_url, model_dir, tmp_path, runs, total=3, save_freq=2)
    bus = RedisBus(store.client, run_id)
    for i in range(2):
        publish_batch(bus, batch(run_id, i))
    loop = start_learner(spec, store, bus)
    train_next(loop)  # step 1, no checkpoint: nothing to prune later
    fill(runs, leave=16 << 10)  # room for a metrics line only
    with pytest.raises(CheckpointDiskFull, match="checkpoint disk full"):
        train_next(loop)
    state = store.state(run_id)
    assert state.status == "failed" and "checkpoint disk full" in state.error
    ckpts = runs / run_id / "checkpoints"
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".tmp")]
    assert bus.lag("batches")["learner"].pending == 2  # nothing acknowledged without a checkpoint


def test_metrics_lines_are_whole_even_on_a_full_disk(tmp_path, small_disk):
    disk = small_disk("64k")
    path = disk / "metrics.jsonl"
    append_line(path, json.dumps({"step": 1}))
    fill(disk, leave=0)
    with pytest.raises(OSError) as err:
        for step in range(2, 10_000):  # until the disk refuses
            append_line(path, json.dumps({"step": step, "pad": "x" * 512}))
    assert err.value.errno == errno.ENOSPC
    text = path.read_text()
    assert text.endswith("\n") and all(json.loads(x) for x in text.splitlines())


def test_a_line_torn_by_a_crash_is_dropped_at_start(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"st')
    drop_torn_line(path)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    drop_torn_line(path)  # a whole file is left alone
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    os.truncate(path, 0)
    drop_torn_line(path)
    assert path.read_text() == ""


def test_a_batch_taken_by_a_former_learner_is_found_and_trained_in_turn(
    redis_url, model_dir, tmp_path
):
    spec, store, run_id = new_run(redis_url, model_dir, tmp_path, tmp_path / "runs", total=2)
    bus = RedisBus(store.client, run_id)
    loop = start_learner(spec, store, bus)
    assert bus.consume("batches", "learner", "learner-0", count=1, block_ms=10,
                       reclaim=False) == []  # fmt: skip
    # a learner that lost its lease (an unfenced client here) takes batch 0 into the pending
    # list of the consumer name both read as, after the new one has re-read that list
    publish_batch(bus, batch(run_id, 0))
    stale = RedisBus(store.client, run_id)
    assert len(stale.consume("batches", "learner", "learner-0", count=1, reclaim=False)) == 1
    publish_batch(bus, batch(run_id, 1))
    train_next(loop)  # batch 1 came first: not trained, the pending list is read again
    assert loop.step == 0
    assert train_next(loop).batch_id == 0 and loop.step == 1
    assert train_next(loop).batch_id == 1 and loop.step == 2
    run_dir = Path(spec.trainer.runs_dir) / run_id
    assert [r["batch_id"] for r in metrics_lines(run_dir)] == [0, 1]
