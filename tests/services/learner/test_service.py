"""The learner loop over the in-memory bus and run store, with a real tiny policy: each
batch trains once, versions are announced, batches are acknowledged only by the checkpoint
that holds them, and a restarted learner resumes from that checkpoint without training
anything twice."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch

from dapo.data.models import load_tokenizer
from dapo.runtime.runs import MemoryRunStore
from dapo.runtime.service import ServiceContext
from dapo.transport.memory_bus import MemoryBus
from dapo.weights.sender import SyncStats
from proto.messages import ScoredGroup, ScoredSample, TrainingBatch
from proto.runspec import RunSpec
from services.learner.checkpoint import newest_checkpoint
from services.learner.main import pad_token_id
from services.learner.policy import build_policy
from services.learner.ranks import SoloRanks
from services.learner.service import CONSUMER, LearnerLoop
from tests.e2e_helpers import make_dataset, make_model_dir, metrics_lines, small_spec


class MemorySender:
    """``WeightBroadcaster`` without workers: remembers what it was asked to send."""

    def __init__(self) -> None:
        self.versions: list[int] = []
        self.names: list[str] = []
        self.checkpoints: list[tuple[int, str]] = []

    def broadcast(
        self, version: int, named_params: Mapping[str, torch.Tensor] | None = None
    ) -> SyncStats:
        if self.versions and version <= self.versions[-1]:
            raise ValueError(f"version {version} is not above {self.versions[-1]}")
        assert named_params is not None  # the loop always hands over the gathered weights
        self.versions.append(version)
        self.names = list(named_params)
        size = sum(t.numel() * t.element_size() for t in named_params.values())
        return SyncStats(version, 1, ("rollout-0",), False, size, f"c{version}",
                         0.0, 0.0, 0.0, 0.0, 0.0)  # fmt: skip

    def publish_checkpoint(self, version: int, checkpoint_dir: str) -> None:
        self.checkpoints.append((version, checkpoint_dir))

    def disagreeing_workers(self, version: int) -> dict[str, str]:
        return {}

    def close(self) -> None:
        pass


def group(run_id: str, gid: str, accs: list[bool]) -> ScoredGroup:
    samples = [
        ScoredSample(
            response_ids=[65, 66 + i, 256],
            logprobs=[-0.5, -1.0, -0.1],
            finish_reason="stop",
            versions=[0],
            version_starts=[0],
            score=1.0 if a else -1.0,
            acc=a,
            overlong_penalty=0.0,
            length=3,
            truncated=False,
        )
        for i, a in enumerate(accs)
    ]
    return ScoredGroup(
        run_id=run_id,
        group_id=gid,
        prompt_id=f"p-{gid}",
        prompt_ids=np.array([49, 43, 61]),
        ground_truth="2",
        n=len(accs),
        policy_version=0,
        worker_id="rollout-0",
        engine="hf",
        gen_seconds=0.0,
        samples=samples,
    )


def batch(run_id: str, batch_id: int) -> TrainingBatch:
    groups = [group(run_id, f"b{batch_id}g{j}", [True, False, j == 0, False]) for j in (0, 1)]
    return TrainingBatch(run_id=run_id, batch_id=batch_id, groups=groups)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("model"))


def start_learner(spec: RunSpec, store: MemoryRunStore, bus: MemoryBus) -> LearnerLoop:
    """What the service's rank 0 does at start, over the memory bus: resume from the newest
    checkpoint (or the base model), then a loop at that checkpoint's step."""
    run_id = bus.run_id
    ctx = ServiceContext(kind="learner", run_id=run_id, spec=spec, worker_id=CONSUMER,
                         bus=bus, store=store)  # fmt: skip
    run_dir = Path(spec.trainer.runs_dir) / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = newest_checkpoint(run_dir / "checkpoints")
    tokenizer = load_tokenizer(spec.model, None)
    policy, step = build_policy(spec, None, ckpt, pad_token_id(tokenizer), SoloRanks("cpu"))
    return LearnerLoop(ctx, policy, tokenizer, MemorySender(), run_dir, step, last_ckpt=ckpt)


def train_next(loop: LearnerLoop) -> TrainingBatch:
    [d] = loop.rt.bus.consume("batches", "learner", CONSUMER, count=1, reclaim=False)
    loop.handle(d)
    return d.message


def announced(bus: MemoryBus) -> list[int]:
    return [m.version for m in bus.read("versions")[1]]


def pending(bus: MemoryBus) -> int:
    return bus.lag("batches")["learner"].pending


def test_learner_loop_trains_checkpoints_acks_and_resumes(model_dir, tmp_path):
    runs = tmp_path / "runs"
    trainer = {"total_training_steps": 4, "save_freq": 2, "runs_dir": str(runs)}
    spec = small_spec(model_dir, make_dataset(tmp_path / "d.jsonl"), runs, trainer=trainer)
    store = MemoryRunStore()
    run_id = store.create(spec).run_id
    store.set_status(run_id, "running")
    bus = MemoryBus(run_id)
    for i in range(3):
        bus.publish("batches", batch(run_id, i))

    first = start_learner(spec, store, bus)
    assert first.step == 0 and first.policy.version == 0
    first.broadcast()  # the initial weights
    assert announced(bus) == [0] and first.sender.versions == [0]
    names = [n for n, _ in first.policy.trainer.model.named_parameters()]
    assert first.sender.names == names  # the full weights, in the model's order

    assert train_next(first).batch_id == 0
    state = store.state(run_id)
    assert (first.step, first.policy.version, state.step, state.policy_version) == (1, 1, 1, 1)
    assert announced(bus) == [0, 1]
    report = store.reports[run_id]
    assert (report.step, report.batch_id, report.version) == (1, 0, 1)
    assert np.isfinite(report.figures["loss"]) and report.figures["grad_norm"] > 0
    assert pending(bus) == 1  # trained, not yet in a checkpoint: held

    train_next(first)  # step 2: save_freq, so a checkpoint holds batches 0 and 1
    ckpt = runs / run_id / "checkpoints" / "step_000002"
    assert (ckpt / "optimizer.pt").is_file() and (ckpt / "tokenizer_config.json").is_file()
    assert first.sender.checkpoints == [(2, str(ckpt))]
    assert pending(bus) == 0
    train_next(first)  # step 3: batch 2 trained, held, then the learner dies
    assert (store.state(run_id).step, pending(bus)) == (3, 1)
    assert [r["batch_id"] for r in metrics_lines(runs / run_id)] == [0, 1, 2]

    bus.publish("batches", batch(run_id, 1))  # an old batch id, sent again: skipped
    bus.publish("batches", batch(run_id, 3))
    restarted = MemoryBus(run_id, broker=bus.broker)  # a new process: re-reads its pending
    second = start_learner(spec, store, restarted)
    assert (second.step, second.policy.version, second.last_ckpt) == (2, 2, ckpt)
    second.run()  # batch 2 again (the checkpoint did not hold it), batch 3, done

    assert [r["batch_id"] for r in metrics_lines(runs / run_id)] == [0, 1, 2, 2, 3]
    assert second.sender.versions == [2, 3, 4]
    assert announced(bus)[-3:] == [2, 3, 4]
    final = runs / run_id / "checkpoints" / "step_000004"
    assert second.sender.checkpoints == [(2, str(ckpt)), (4, str(final))]
    lag = bus.lag("batches")["learner"]
    assert (lag.pending, lag.lag) == (0, 0)  # every batch acknowledged, none left to deliver
    state = store.state(run_id)
    assert (state.status, state.final_checkpoint) == ("completed", str(final))
    assert (state.step, state.policy_version) == (4, 4)
    assert (store.reports[run_id].step, store.reports[run_id].batch_id) == (4, 3)
    assert bus.dead_count() == 0
