"""The learner loop with a double-buffering sender (``DAPO_SYNC_DOUBLE_BUFFER``): a real
``WeightSender`` over the test's Redis and a real rollout-worker process. The next step
trains while the previous version is still on its way, a version is announced only after
its background broadcast reached the worker, and the worker ends up holding every
announced version bit for bit."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import redis
import torch

from dapo.data.models import load_tokenizer
from dapo.runtime.runs import MemoryRunStore
from dapo.runtime.service import ServiceContext
from dapo.transport.memory_bus import MemoryBus
from dapo.weights.buckets import BucketLayout
from dapo.weights.receiver import WeightReceiver
from dapo.weights.registry import stale_or_mismatched_workers
from dapo.weights.sender import WeightSender
from services.learner.main import pad_token_id
from services.learner.policy import build_policy
from services.learner.ranks import SoloRanks
from services.learner.service import CONSUMER, LearnerLoop
from tests.e2e_helpers import make_dataset, make_model_dir, small_spec
from tests.services.learner.test_service import announced, batch, publish_batch


def worker_main(url: str, run_id: str, layout_json: str, out: str) -> None:
    """Receives every version into its own tensors and saves them; deaf while busy."""
    torch.set_num_threads(1)
    client = redis.Redis.from_url(url)
    held: dict[str, torch.Tensor] = {}

    def load(views) -> None:
        for name, view in views:
            held[name] = view.clone()

    layout = BucketLayout.from_json(layout_json)
    receiver = WeightReceiver(client, run_id, "w-0", layout, load, stream=True)
    receiver.join(wait_s=30)
    client.rpush(f"test:{run_id}:joined", 1)
    while not client.exists(f"test:{run_id}:stop"):
        if client.exists(f"test:{run_id}:busy"):
            client.set(f"test:{run_id}:deaf", 1)  # seen: no poll until it is cleared
            time.sleep(0.05)
            continue
        client.delete(f"test:{run_id}:deaf")
        version = receiver.poll(timeout_s=0.5)
        if version is not None:
            torch.save(held, Path(out) / f"v{version}.pt")
    receiver.close()


def test_the_next_step_trains_while_the_previous_version_is_sent(tmp_path, redis_url):
    runs = tmp_path / "runs"
    spec = small_spec(make_model_dir(tmp_path / "model"), make_dataset(tmp_path / "d.jsonl"),
                      runs, trainer={"total_training_steps": 4, "runs_dir": str(runs)})  # fmt: skip
    store = MemoryRunStore()
    run_id = store.create(spec).run_id
    store.set_status(run_id, "running")
    bus = MemoryBus(run_id)
    for i in range(2):
        publish_batch(bus, batch(run_id, i))
    tokenizer = load_tokenizer(spec.model, None)
    policy, _ = build_policy(spec, None, None, pad_token_id(tokenizer), SoloRanks("cpu"))
    model = policy.trainer.model
    client = redis.Redis.from_url(redis_url)
    sender = WeightSender(client, run_id, list(model.named_parameters()), bucket_mb=0.05,
                          timeout_s=30, join_timeout_s=60, double_buffer=True)  # fmt: skip
    ctx = ServiceContext(kind="learner", run_id=run_id, spec=spec, worker_id=CONSUMER,
                         bus=bus, store=store)  # fmt: skip
    (runs / run_id).mkdir(parents=True)
    loop = LearnerLoop(ctx, policy, tokenizer, sender, runs / run_id, 0)
    args = (redis_url, run_id, sender.layout.to_json(), str(tmp_path))
    worker = mp.get_context("spawn").Process(target=worker_main, args=args, daemon=True)
    worker.start()
    busy, seen, weights = f"test:{run_id}:busy", [], {}
    train = policy.trainer.train_batch

    def train_batch(b):  # records what was in flight when each step began
        seen.append((b.batch_id, sender.busy, announced(bus)))
        weights[policy.version] = {n: p.detach().clone() for n, p in model.named_parameters()}
        if b.batch_id == 1:  # the worker listens again: version 1 moves on while this trains
            client.delete(busy)
        return train(b)

    policy.trainer.train_batch = train_batch
    try:
        deadline = time.monotonic() + 60  # short BLPOPs: the client's socket timeout is 5 s
        while client.blpop([f"test:{run_id}:joined"], timeout=1) is None:
            assert time.monotonic() < deadline, "the worker never joined"
        loop.broadcast()  # version 0, in the background
        _wait_announced(loop, bus, 0)
        client.set(busy, 1)  # version 1 waits in the ack wait until step 2 trains
        while not client.exists(f"test:{run_id}:deaf"):
            time.sleep(0.05)
        for _ in range(2):
            [d] = bus.consume("batches", "learner", CONSUMER, count=1, reclaim=False)
            loop.handle(d)
        _wait_announced(loop, bus, 2)
        # step 2 began while version 1 was in flight and not yet announced
        assert seen == [(0, False, [0]), (1, True, [0])]
        assert announced(bus) == [0, 1, 2]  # each once it arrived, in order
        for version in (1, 2):
            got = torch.load(tmp_path / f"v{version}.pt")
            want = weights[version] if version in weights else dict(model.named_parameters())
            for name, tensor in want.items():
                assert torch.equal(got[name], tensor.detach()), (version, name)
        assert stale_or_mismatched_workers(client, run_id, 2) == {}
    finally:
        client.set(f"test:{run_id}:stop", 1)
        sender.close()
        worker.join(timeout=30)
        if worker.is_alive():
            worker.kill()


def _wait_announced(loop: LearnerLoop, bus: MemoryBus, version: int) -> None:
    """What the idle loop does between batches, until ``version`` is announced."""
    deadline = time.monotonic() + 120
    while version not in announced(bus):
        assert time.monotonic() < deadline, f"version {version} never announced"
        loop.maybe_resend()
        time.sleep(0.05)
