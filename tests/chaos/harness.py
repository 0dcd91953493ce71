"""Tools of the chaos suite: a Redis with the chart's persistence that can be killed, frozen
and started again; poison for every stream; an observer that sees every training batch;
and the accounting of what the streams still hold."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import redis

from proto.codec import DecodeError, decode, encode
from proto.keys import run_key
from proto.messages import HELD_CONSUMER, STREAM_MESSAGES, TrainingBatchRef
from tests.factories import prompt_task, rollout_group, scored_group, weight_version
from tests.restartable_redis import RestartableRedis

CHART_VALUES = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "values.yaml"


def chart_appendfsync() -> str:
    """The chart's ``redis.appendfsync`` (values.yaml), what a cluster's Redis runs with."""
    found = re.search(r"^\s*appendfsync:\s*(\w+)", CHART_VALUES.read_text(), re.MULTILINE)
    if found is None:
        raise RuntimeError(f"no appendfsync in {CHART_VALUES}")
    return found.group(1)


@dataclass
class ChaosRedis(RestartableRedis):
    """A redis-server with append-only persistence (the chart's fsync policy) on a fixed
    port and folder: ``kill9`` + ``start`` is a crashed and rescheduled Redis pod, ``freeze``
    a Redis that stops answering (a partition, a stalled node)."""

    appendfsync: str = field(default_factory=chart_appendfsync)

    def kill9(self) -> None:
        self.kill()

    def freeze(self, seconds: float) -> None:
        """SIGSTOP for ``seconds``, then SIGCONT: connections stay open, nothing answers."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(timeout=30)


def poison(run_id: str, n: int) -> dict[str, list[dict]]:
    """Hostile entries for every stream (``n`` tells one injection from the next): a field
    name that is not UTF-8, a broken header, a newer schema, and a well-formed message each
    consumer must refuse (token ids beyond the vocabulary, another run's group or batch)."""
    stranger = "chaos-stranger"
    well_formed = {
        "prompts": prompt_task(run_id, n).model_copy(
            update={"group_id": f"poison-p{n}", "prompt_ids": np.array([1, 10**6], np.int32)}
        ),
        "rollouts": rollout_group(run_id, f"poison-r{n}", [[-1, 65], [65, 256]]),
        "scored": scored_group(stranger, f"poison-s{n}", [True, False]),
        "batches": TrainingBatchRef(
            run_id=stranger, batch_id=0, entry_ids=["1-0"], group_ids=[f"poison-b{n}"]
        ),
        "versions": weight_version(stranger, 10**6),
    }
    out = {}
    for stream, msg in well_formed.items():
        kind = STREAM_MESSAGES[stream].kind
        out[stream] = [
            {b"\xff\xfe" + str(n).encode(): b"\x80\x81"},
            {"v": "1", "k": kind, "h": "{not json", "b": b""},
            {**encode(msg), "v": b"99"},
            encode(msg),
        ]
    return out


DEAD_LETTERED = {"prompts": 4, "rollouts": 4, "scored": 4, "batches": 4, "versions": 3}
"""Of each injection, what must end in the dead letters (another run's version announcement
is ignored by the sampler, not dead-lettered; undecodable ones are, once per reader)."""


def inject(client: redis.Redis, run_id: str, n: int) -> int:
    count = 0
    for stream, entries in poison(run_id, n).items():
        for fields in entries:
            client.xadd(run_key(run_id, stream), fields)
            count += 1
    return count


class BatchObserver(threading.Thread):
    """Reads the ``batches`` stream in a consumer group of its own (so trimming keeps every
    entry until it has seen it) and records each training batch of the run."""

    GROUP = "chaos-observer"

    def __init__(self, url: str, run_id: str) -> None:
        super().__init__(daemon=True, name="batch-observer")
        self.client = redis.Redis.from_url(url, socket_timeout=3.0, socket_connect_timeout=1.0)
        self.key, self.run_id = run_key(run_id, "batches"), run_id
        self.batches: list[TrainingBatchRef] = []
        self.halt = threading.Event()
        self.client.xgroup_create(self.key, self.GROUP, id="0", mkstream=True)

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.read_once(block_ms=500)
            except redis.RedisError:
                time.sleep(0.5)  # Redis is down or frozen: the chaos at work

    def read_once(self, block_ms: int | None = None) -> int:
        """One read; ``block_ms`` None: return at once when there is nothing new."""
        resp = self.client.xreadgroup(self.GROUP, "observer", {self.key: ">"}, count=64,
                                      block=block_ms)  # fmt: skip
        entries = [e for _, batch in resp or [] for e in batch]
        for entry_id, fields in entries:
            try:
                msg = decode(fields, TrainingBatchRef)
            except DecodeError:
                pass
            else:
                if msg.run_id == self.run_id:
                    self.batches.append(msg)
            self.client.xack(self.key, self.GROUP, entry_id)
        return len(entries)

    def finish(self) -> None:
        self.halt.set()
        self.join(timeout=10)
        while self.read_once():
            pass


def prompts_on_streams(client: redis.Redis, run_id: str) -> int:
    """Prompts of the run still somewhere on the streams: an entry pending in its consumer
    group or not yet delivered to it, whose group id the sampler dispatched (poison aside)."""
    total = 0
    pattern = re.compile(re.escape(run_id) + r"-\d+")
    for stream, group in (("prompts", "rollout"), ("rollouts", "reward"), ("scored", "sampler")):
        key = run_key(run_id, stream)
        info = {g["name"].decode(): g for g in client.xinfo_groups(key)}[group]
        rows = client.xpending_range(key, group, "-", "+", 100_000)
        # groups of published batches wait, held, for the learner's checkpoint: trained
        ids = [r["message_id"] for r in rows if r["consumer"].decode() != HELD_CONSUMER]
        waiting = [e for e in client.xrange(key, min=f"({info['last-delivered-id'].decode()}")]
        entries = [e for i in ids for e in client.xrange(key, i, i)] + waiting
        for _, fields in entries:
            try:
                msg = decode(fields, STREAM_MESSAGES[stream])
            except DecodeError:
                continue
            total += msg.run_id == run_id and bool(pattern.fullmatch(msg.group_id))
    return total
