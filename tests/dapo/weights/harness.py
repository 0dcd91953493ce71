"""The weight-sync tests' model and their cluster of real rollout-worker processes.

The learner (`WeightSender`) runs in the test process and each rollout worker
in a spawned process with real gloo groups and the private Redis of the
`redis_url` fixture. Workers save what they received to disk, so a test
compares tensors bit for bit.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import redis
import torch
from torch import nn

from dapo.weights.receiver import WeightReceiver
from dapo.weights.registry import WeightSyncError, needs_checkpoint

BUCKET_MB = 0.004  # ~4 KiB: the tiny model spans several buckets
DEEP_BUCKET_MB = 0.008  # one bucket per 64x64 bf16 weight: the deep model spans 8+ buckets


def make_model(deep: bool = False) -> nn.Module:
    """A few Linear layers, one of them bf16, so the layout holds two dtypes; `deep`: eight
    fp32 64x64 layers (~130 KiB), many buckets at `DEEP_BUCKET_MB`."""
    torch.manual_seed(1234)
    if deep:
        return nn.Sequential(*[nn.Linear(64, 64) for _ in range(8)])
    model = nn.Sequential(nn.Linear(16, 48), nn.Tanh(), nn.Linear(48, 48), nn.Linear(48, 8))
    model[2].to(torch.bfloat16)
    return model


def set_weights(model: nn.Module, version: int) -> None:
    """Deterministic, version-dependent weights (the learner's 'optimizer step')."""
    gen = torch.Generator().manual_seed(version)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen).to(param.dtype))


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_bit_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        as_bytes = [t.reshape(-1).view(torch.uint8) for t in (got[name], tensor)]
        assert torch.equal(*as_bytes), name


# ---------------------------------------------------------------- real processes


class FreezingReceiver(WeightReceiver):
    """Stops its own process (SIGSTOP) after acking `freeze_at`, as a hung worker would."""

    freeze_at = -1

    def _ensure_group(self, plan: dict) -> None:
        if plan["version"] == self.freeze_at:
            os.kill(os.getpid(), signal.SIGSTOP)
        super()._ensure_group(plan)


def worker_main(redis_url: str, run_id: str, worker_id: str, out: str, opts: dict) -> None:
    """A rollout worker: joins, polls until told to stop, saves every version it loads."""
    torch.set_num_threads(1)
    if opts.get("device", "cpu").startswith("cuda"):
        torch.cuda.set_device(opts["device"])  # this worker's NCCL communicator lives there
    client = redis.Redis.from_url(redis_url)
    model = make_model(opts.get("deep", False))
    params = dict(model.named_parameters())

    loads = []

    def load(views) -> None:  # a list, or a one-pass stream with `stream`: copy as it comes
        loads.append(1)
        with torch.no_grad():
            for index, (name, tensor) in enumerate(views):
                if len(loads) == opts.get("die_in_load") and index == 1:  # mid-transfer
                    os.kill(os.getpid(), signal.SIGKILL)
                if len(loads) == opts.get("freeze_in_load") and index == 1:  # hung
                    os.kill(os.getpid(), signal.SIGSTOP)
                params[name].copy_(tensor)
            if opts.get("corrupt"):
                params["0.bias"][0] += 1.0  # the engine ends up with other weights

    state_fn = (lambda: list(model.named_parameters())) if opts.get("verify") else None
    receiver = FreezingReceiver(
        client, run_id, worker_id, list(params.items()), load, state_fn=state_fn,
        liveness_s=opts.get("liveness_s", 15.0), stream=opts.get("stream", False),
        device=opts.get("device", "cpu"),
    )  # fmt: skip
    receiver.freeze_at = opts.get("freeze_at", -1)
    if ref := needs_checkpoint(client, run_id, receiver.version):
        client.rpush(f"test:{run_id}:ckpt:{worker_id}", json.dumps(list(ref)))
        model.load_state_dict(torch.load(Path(ref.checkpoint_dir) / "model.pt"))
        receiver.join(wait_s=30)
        receiver.set_version(ref.version)
    else:
        receiver.join(wait_s=30)
    client.rpush(f"test:{run_id}:joined", worker_id)
    while not client.exists(f"test:{run_id}:stop"):
        if client.exists(f"test:{run_id}:busy:{worker_id}"):  # generating, deaf to updates
            time.sleep(0.05)
            continue
        try:
            version = receiver.poll(timeout_s=0.5)
        except WeightSyncError:
            continue
        if version is not None:
            torch.save(state_of(model), Path(out) / f"{worker_id}-v{version}.pt")
            if receiver.pool is not None:  # staging buffers it ever held at once
                client.set(f"test:{run_id}:peak:{worker_id}", receiver.pool.peak)
            client.rpush(f"test:{run_id}:got", f"{worker_id}:{version}")
    receiver.close()


class Cluster:
    """Spawned workers plus helpers to wait for their Redis signals."""

    def __init__(self, redis_url: str, run_id: str, out: Path) -> None:
        self.client = redis.Redis.from_url(redis_url)
        self.redis_url, self.run_id, self.out = redis_url, run_id, out
        self.procs: dict[str, mp.process.BaseProcess] = {}

    def start(self, *worker_ids: str, **opts) -> None:
        ctx = mp.get_context("spawn")
        for worker in worker_ids:
            args = (self.redis_url, self.run_id, worker, str(self.out), opts)
            self.procs[worker] = ctx.Process(target=worker_main, args=args, daemon=True)
            self.procs[worker].start()
        for _ in worker_ids:
            self.pop("joined", timeout=60)

    def pop(self, what: str, timeout: float = 30) -> str:
        # short BLPOPs up to the deadline: one long one would outlast the client's socket
        # timeout (redis-py's default is 5 s) on a loaded machine
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            item = self.client.blpop([f"test:{self.run_id}:{what}"], timeout=1)
            if item is not None:
                return item[1].decode()
        raise AssertionError(f"no {what!r} signal within {timeout}s")

    def wait_loaded(self, version: int, workers) -> None:
        pending = {f"{w}:{version}" for w in workers}
        while pending:
            got = self.pop("got")
            assert got in pending, f"unexpected {got}, waiting for {pending}"
            pending.discard(got)

    def received(self, worker: str, version: int) -> dict[str, torch.Tensor]:
        return torch.load(self.out / f"{worker}-v{version}.pt")

    def stop(self) -> None:
        self.client.set(f"test:{self.run_id}:stop", 1)
        for proc in self.procs.values():
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
