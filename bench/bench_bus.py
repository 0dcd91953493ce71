"""Bus throughput against raw Redis streams, and the codec's cost per group.

Payload: a rollout group of G=16 samples x 4096 tokens (int32 ids + float32
log-probs, ~512 KiB). ``bus.*``: publish (with a dedupe key) + consume
(decode + validation) + acknowledge through ``RedisBus``. ``raw``: pipelined
XADD / XREADGROUP / XACK of the same bytes with no decoding, in the same run
against the same embedded server.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import redis

from dapo.transport.bus import BusSettings
from dapo.transport.redis_bus import RedisBus
from dapo.transport.redis_embed import EmbeddedRedis
from proto.codec import decode, encode
from proto.messages import RolloutGroup, Sample

G, TOKENS, N_GROUPS, BATCH = 16, 4096, 192, 16


def make_group(i: int = 0) -> RolloutGroup:
    rng = np.random.default_rng(i)
    samples = [
        Sample(
            response_ids=rng.integers(0, 150_000, TOKENS, dtype=np.int32),
            logprobs=-rng.random(TOKENS, dtype=np.float32),
            finish_reason="length",
            versions=[0],
            version_starts=[0],
        )
        for _ in range(G)
    ]
    return RolloutGroup(
        run_id="bench",
        group_id=f"g{i}",
        prompt_id="p",
        prompt_ids=np.arange(256, dtype=np.int32),
        ground_truth="1",
        n=G,
        policy_version=0,
        worker_id="w",
        engine="hf",
        gen_seconds=0.0,
        samples=samples,
    )


def roundtrip_ms(group: RolloutGroup, repeats: int = 50) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        decode(encode(group), RolloutGroup)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def bus_rate(url: str, group: RolloutGroup, run_id: str) -> float:
    bus = RedisBus(redis.Redis.from_url(url), run_id, BusSettings(trim_every=BATCH))
    bus.ensure_group("rollouts", "reward")
    t0 = time.perf_counter()
    done = 0
    for start in range(0, N_GROUPS, BATCH):
        keys = [f"g{i}" for i in range(start, start + BATCH)]
        bus.publish_many("rollouts", [group] * BATCH, keys)
        got = bus.consume("rollouts", "reward", "c0", count=BATCH, block_ms=1000)
        bus.ack_many(got)
        done += len(got)
    assert done == N_GROUPS, done
    return N_GROUPS / (time.perf_counter() - t0)


def raw_rate(url: str, group: RolloutGroup, key: str) -> float:
    client = redis.Redis.from_url(url)
    fields = encode(group)
    client.xgroup_create(key, "reward", id="0", mkstream=True)
    t0 = time.perf_counter()
    done = 0
    for _ in range(0, N_GROUPS, BATCH):
        pipe = client.pipeline(transaction=False)
        for _ in range(BATCH):
            pipe.xadd(key, fields)
        pipe.execute()
        resp = client.xreadgroup("reward", "c0", {key: ">"}, count=BATCH, block=1000)
        ids = [e[0] for e in resp[0][1]]
        client.xack(key, "reward", *ids)
        client.xtrim(key, minid=ids[-1])
        done += len(ids)
    assert done == N_GROUPS, done
    return N_GROUPS / (time.perf_counter() - t0)


def run() -> dict[str, float]:
    group = make_group()
    size_mb = sum(len(v) for v in encode(group).values()) / 1e6
    with EmbeddedRedis() as r:
        raw, ours = [], []
        for rep in range(3):  # alternate so drift hits both equally
            raw.append(raw_rate(r.url, group, f"bench-raw-{rep}"))
            ours.append(bus_rate(r.url, group, f"bench-bus-{rep}"))
    groups_per_s = statistics.median(ours)
    return {
        "bus.groups_per_s": groups_per_s,
        "bus.mb_per_s": groups_per_s * size_mb,
        "bus.raw_ratio": groups_per_s / statistics.median(raw),
        "proto.group_roundtrip_ms": roundtrip_ms(group),
    }


if __name__ == "__main__":
    print(run())
