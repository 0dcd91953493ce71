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

Streaming and double buffering (`run_streaming`), on a Qwen2-shaped random model
(`QWEN2`: hidden 1024, 24 layers, MLP 2816, 16 query / 2 key-value heads, vocab 32768,
untied head: 0.33 B parameters, 1.3 GB in fp32) sent in bf16 (0.66 GB on the wire) to one
streaming receiver process (``stream=True``, fp32 parameters of its own) over gloo on
loopback, 64 MiB buckets:

- ``weights.learner_stall_s.sync`` / ``.double_buffered`` (with ``_min``/``_max``): how
  long the learner is held per broadcast, the median over `STALL_ROUNDS` rounds after a
  warm-up, both modes in the same run. Each round "trains" first (single-threaded
  matmuls for about one transfer time, then an in-place change of every weight), then
  hands the weights over: ``broadcast`` (held for the whole transfer) or ``start``
  (held for the snapshot, plus any wait for the previous version still in flight);
- ``weights.peak_extra_mb.learner`` / ``.receiver``: the rise of the process's peak
  resident set during its first streamed sync (group set-up included) over its resident
  set just before: the kernel's high-water mark (``VmHWM``) is reset through
  ``/proc/self/clear_refs`` before the sync and read after, so every byte torch, gloo or
  Python touched counts; ``.learner_double_buffered``: the same for the first ``start``
  (its snapshot is a model in bf16); ``weights.bucket_mb`` and ``weights.model_mb_wire``
  for scale.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
import uuid
from datetime import timedelta
from pathlib import Path

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
    figures = {
        "weights.sync_s": sync_s,
        "weights.gb_per_s": shared[0].bytes / sync_s / 1e9,
        "weights.raw_ratio": raw_s / sync_s,
        "weights.raw_ratio_copy": raw_s / copy_s,
        "weights.pack_s_copy": statistics.median(s.pack_s for s in copied),
        "weights.rendezvous_s": statistics.median(s.rendezvous_s for s in shared),
    }
    return {**figures, **run_streaming()}


QWEN2 = dict(hidden=1024, layers=24, mlp=2816, heads=16, kv_heads=2, vocab=32768)
STREAM_BUCKET_MB, STALL_ROUNDS = 64.0, 5


def qwen2_shapes(hidden, layers, mlp, heads, kv_heads, vocab) -> list[tuple[str, tuple]]:
    """Parameter names and shapes of a Qwen2 causal LM (HF naming), untied head."""
    kv = hidden // heads * kv_heads
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes += [(f"{p}.self_attn.q_proj.weight", (hidden, hidden))]
        shapes += [(f"{p}.self_attn.q_proj.bias", (hidden,))]
        for name in ("k_proj", "v_proj"):
            shapes += [(f"{p}.self_attn.{name}.weight", (kv, hidden))]
            shapes += [(f"{p}.self_attn.{name}.bias", (kv,))]
        shapes += [(f"{p}.self_attn.o_proj.weight", (hidden, hidden))]
        shapes += [(f"{p}.mlp.{n}_proj.weight", (mlp, hidden)) for n in ("gate", "up")]
        shapes += [(f"{p}.mlp.down_proj.weight", (hidden, mlp))]
        shapes += [
            (f"{p}.{n}.weight", (hidden,)) for n in ("input_layernorm", "post_attention_layernorm")
        ]
    return shapes + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def qwen2_params() -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [(n, torch.randn(shape, generator=gen) * 0.02) for n, shape in qwen2_shapes(**QWEN2)]


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_extra_mb(action, *args):
    """(result, MiB the peak resident set rose above the resident set before `action`)."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    before = _status_kb("VmRSS")
    result = action(*args)
    return result, (_status_kb("VmHWM") - before) / 1024


def stream_receiver_main(url: str, run_id: str) -> None:
    """Polls until told to stop; reports the peak extra memory of its first update."""
    torch.set_num_threads(1)
    client = redis.Redis.from_url(url, socket_timeout=None)
    params = dict(qwen2_params())

    def load(views) -> None:  # a one-pass stream: copy each tensor as it comes
        for name, tensor in views:
            params[name].copy_(tensor)

    receiver = WeightReceiver(client, run_id, "bench-stream", list(params.items()), load,
                              stream=True)  # fmt: skip
    receiver.join(wait_s=120)
    first = True
    while not client.exists(f"bench:{run_id}:stop"):
        version, extra = peak_extra_mb(receiver.poll, 1.0)
        if version is not None and first:
            client.rpush(f"bench:{run_id}:receiver_mb", extra)
            first = False
    receiver.close()


def train_for(params, matmuls: int) -> None:
    """A stand-in for one training step: compute, then every weight changes in place."""
    a = torch.randn(512, 512)
    for _ in range(matmuls):
        a = torch.tanh(a @ a)
    with torch.no_grad():
        for _, tensor in params:
            tensor.add_(1e-3)


def _stalls(sender, params, matmuls: int, double: bool, first_version: int) -> dict:
    stalls, waits, snapshots = [], [], []
    for round_ in range(STALL_ROUNDS + 1):
        train_for(params, matmuls)
        version = first_version + round_
        tick = time.perf_counter()
        if double:
            sender.start(version)
            waits.append(sender.in_flight.wait_s)
            snapshots.append(sender.in_flight.snapshot_s)
        else:
            sender.broadcast(version)
        stalls.append(time.perf_counter() - tick)
    sender.in_flight.wait()
    outcomes = sender.finished()
    assert all(not isinstance(o, Exception) for o in outcomes), outcomes
    # the first round is a warm-up (first touch of the snapshot, the first start's thread)
    mode = "double_buffered" if double else "sync"
    figures = _spread(f"weights.learner_stall_s.{mode}", stalls[1:])
    if double:
        figures["weights.double_buffer.wait_s"] = statistics.median(waits[1:])
        figures["weights.double_buffer.snapshot_s"] = statistics.median(snapshots[1:])
        figures["weights.double_buffer.transfer_s"] = statistics.median(
            o.total_s for o in outcomes[1:]
        )
    return figures


def _spread(name: str, values: list[float]) -> dict[str, float]:
    return {name: statistics.median(values), f"{name}_min": min(values), f"{name}_max": max(values)}


def run_streaming() -> dict[str, float]:
    """Streamed bf16 syncs of the Qwen2-shaped model (module doc)."""
    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url, socket_timeout=None)
        run_id = f"bench-{uuid.uuid4().hex[:8]}"
        params = qwen2_params()
        sender = WeightSender(client, run_id, params, bucket_mb=STREAM_BUCKET_MB,
                              timeout_s=120, wire_dtype=torch.bfloat16)  # fmt: skip
        proc = mp.get_context("spawn").Process(target=stream_receiver_main,
                                               args=(server.url, run_id))  # fmt: skip
        proc.start()
        try:
            while not client.hlen(sender.keys.workers):
                time.sleep(0.05)
            stats, learner_mb = peak_extra_mb(sender.broadcast, 0)
            receiver_mb = float(client.blpop([f"bench:{run_id}:receiver_mb"], timeout=300)[1])
            tick = time.perf_counter()
            train_for(params, 20)
            per_matmul = (time.perf_counter() - tick) / 20
            matmuls = max(1, round(stats.total_s / per_matmul))  # one step ~ one transfer
            _, double_mb = peak_extra_mb(sender.start, 1)
            sender.in_flight.wait()
            sender.finished()
            sync = _stalls(sender, params, matmuls, False, 2)
            double = _stalls(sender, params, matmuls, True, 3 + STALL_ROUNDS)
        finally:
            client.set(f"bench:{run_id}:stop", 1)
            sender.close()
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    return {
        **sync,
        **double,
        "weights.train_step_s": matmuls * per_matmul,
        "weights.peak_extra_mb.learner": learner_mb,
        "weights.peak_extra_mb.receiver": receiver_mb,
        "weights.peak_extra_mb.learner_double_buffered": double_mb,
        "weights.staging_mb.learner": stats.staging_bytes / (1 << 20),
        "weights.bucket_mb": STREAM_BUCKET_MB,
        "weights.model_mb_wire": sender.layout.total_bytes / (1 << 20),
    }


if __name__ == "__main__":
    for key, value in run().items():
        print(f"{key:<28} {value:.4g}")
