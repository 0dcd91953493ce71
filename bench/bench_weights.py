"""Weight sync throughput against a raw broadcast of one flat buffer, same group, same run.

Model: 10 transformer-like blocks of fp32 tensors (hidden 512, MLP 2048, 9
tensors each) plus an embedding: ~176 MB in 92 tensors. One receiver process
over gloo on loopback; its `load_fn` copies into its own parameters. Each
round runs, in turn: a sync with the sender's default shared storage (the
parameters live in the flat buffers, nothing to pack), a sync of separate
tensors (the pack copies every byte), and a raw `broadcast` of a preallocated
flat buffer of the same size over the same process group. Medians over the
rounds after a warm-up round; the receiver is waiting before each transfer.

- ``weights.sync_s``: `WeightSender.broadcast` (handshake + pack + bucket
  broadcasts + checksum), default shared storage;
- ``weights.gb_per_s``: bytes / sync_s;
- ``weights.raw_ratio``: raw broadcast time / sync_s (1.0 = no overhead);
- ``weights.raw_ratio_copy``, ``weights.pack_s_copy``: the same with a pack copy;
- ``weights.rendezvous_s``: the Redis handshake (acks + plan) inside sync_s.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
import uuid
from datetime import timedelta

import redis
import torch

from dapo.transport.redis_embed import EmbeddedRedis
from dapo.weights.buckets import start_broadcast
from dapo.weights.receiver import WeightReceiver
from dapo.weights.sender import WeightSender

HIDDEN, MLP, BLOCKS, VOCAB, ROUNDS = 512, 2048, 10, 8192, 8
TIMEOUT = timedelta(seconds=60)


def make_params() -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    shapes = [("embed.weight", (VOCAB, HIDDEN))]
    for b in range(BLOCKS):
        shapes += [(f"blocks.{b}.attn.{p}.weight", (HIDDEN, HIDDEN)) for p in "qkvo"]
        shapes += [(f"blocks.{b}.mlp.{p}.weight", (MLP, HIDDEN)) for p in ("up", "gate")]
        shapes += [(f"blocks.{b}.mlp.down.weight", (HIDDEN, MLP))]
        shapes += [(f"blocks.{b}.norm{i}.weight", (HIDDEN,)) for i in (1, 2)]
    shapes.append(("norm.weight", (HIDDEN,)))
    return [(name, torch.randn(shape, generator=gen)) for name, shape in shapes]


def receiver_main(url: str, run_id: str) -> None:
    """Loads every update, then joins the raw broadcast the sender asks for."""
    torch.set_num_threads(1)
    client = redis.Redis.from_url(url, socket_timeout=None)  # BLPOPs below wait up to 60 s
    params = dict(make_params())

    def load(views: list[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in views:
            params[name].copy_(tensor)

    receiver = WeightReceiver(client, run_id, "bench-worker", list(params.items()), load)
    receiver.join(wait_s=60)
    raw = torch.zeros(receiver.layout.total_bytes, dtype=torch.uint8)
    while True:
        command = client.blpop([f"bench:{run_id}:cmd"], timeout=60)
        if command is None or command[1] == b"stop":
            break
        if command[1] == b"sync":
            receiver.poll(timeout_s=60)
        else:
            start_broadcast(receiver.group, raw, TIMEOUT).wait(TIMEOUT)
        client.rpush(f"bench:{run_id}:done", 1)
    receiver.close()


class Driver:
    """Tells the receiver what comes next and waits until it has finished."""

    def __init__(self, client: redis.Redis, run_id: str) -> None:
        self.client, self.run_id = client, run_id

    def step(self, command: str, action, *args):
        self.client.rpush(f"bench:{self.run_id}:cmd", command)
        tick = time.perf_counter()
        result = action(*args)
        elapsed = time.perf_counter() - tick
        if self.client.blpop([f"bench:{self.run_id}:done"], timeout=60) is None:
            raise TimeoutError(f"receiver did not finish {command!r}")
        return result, elapsed


def run() -> dict[str, float]:
    torch.set_num_threads(1)
    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url, socket_timeout=None)  # BLPOPs up to 60 s
        run_id = f"bench-{uuid.uuid4().hex[:8]}"
        named = make_params()
        copies = [(name, tensor.clone()) for name, tensor in named]  # not in the buffers
        sender = WeightSender(client, run_id, named, timeout_s=60)
        raw = torch.ones(sender.layout.total_bytes, dtype=torch.uint8)
        proc = mp.get_context("spawn").Process(target=receiver_main, args=(server.url, run_id))
        proc.start()
        while not client.hlen(sender.keys.workers):
            time.sleep(0.05)
        driver, shared, copied, raws = Driver(client, run_id), [], [], []

        def raw_broadcast() -> None:
            start_broadcast(sender.group, raw, TIMEOUT).wait(TIMEOUT)

        try:
            for round_ in range(ROUNDS + 1):
                with torch.no_grad():
                    named[round_ % len(named)][1].add_(1.0)  # weights change between versions
                shared.append(driver.step("sync", sender.broadcast, 2 * round_)[0])
                copied.append(driver.step("sync", sender.broadcast, 2 * round_ + 1, copies)[0])
                raws.append(driver.step("raw", raw_broadcast)[1])
        finally:
            client.rpush(f"bench:{run_id}:cmd", "stop")
            sender.close()
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    shared, copied, raws = shared[1:], copied[1:], raws[1:]  # warm-up: group build, first touch
    raw_s = statistics.median(raws)
    sync_s = statistics.median(s.total_s for s in shared)
    copy_s = statistics.median(s.total_s for s in copied)
    return {
        "weights.sync_s": sync_s,
        "weights.gb_per_s": shared[0].bytes / sync_s / 1e9,
        "weights.raw_ratio": raw_s / sync_s,
        "weights.raw_ratio_copy": raw_s / copy_s,
        "weights.pack_s_copy": statistics.median(s.pack_s for s in copied),
        "weights.rendezvous_s": statistics.median(s.rendezvous_s for s in shared),
    }


if __name__ == "__main__":
    for key, value in run().items():
        print(f"{key:<28} {value:.4g}")
