"""The sharded learner streams its weights: on 2 real CPU ranks (gloo, torchrun), rank 0's
``WeightSender`` reads ``Policy.gather_weights`` one all-gathered parameter at a time,
casts each into a staging bucket in bf16 and never holds more than a few buckets; rank 1
joins each gather in step (the command reaches it on the first read). The checksum equals
that of the whole gathered model cast to bf16.

The worker half of this file runs under ``torchrun``; rank 0 writes its findings to a JSON
file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]


def test_rank0_streams_the_gathered_weights_through_a_few_buckets(tmp_path, redis_url):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(Path(__file__).resolve()), str(tmp_path), redis_url,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["layout_dtypes"] == ["torch.bfloat16"] and r["buckets"] >= 4
    assert r["order"] == r["model_order"]  # read once, in model order
    assert r["streamed_checksum"] == r["whole_checksum"]  # the same bytes as the whole model
    assert 0 < r["staging_bytes"] <= (r["depth"] + 1) * r["bucket_bytes"] < r["total_bytes"]


def _worker(out: Path, redis_url: str) -> None:
    """One rank (under torchrun): shard a tiny Qwen2, stream its weights from rank 0."""
    import redis

    from dapo.weights.buckets import FlatBuffers
    from dapo.weights.sender import WeightSender
    from services.learner.distributed import meta_params, shard_model
    from services.learner.policy import Policy
    from services.learner.ranks import init_ranks
    from tests.services.learner.test_trainer import tiny_model

    torch.set_num_threads(1)
    ranks = init_ranks("cpu")
    model = shard_model(tiny_model(torch.float32))
    policy = Policy(type("T", (), {"model": model})(), ranks)
    if ranks.rank != 0:
        policy.follow()  # "weights" twice, then "stop"
        ranks.barrier()  # both ranks leave the group together, as the learner does
        ranks.close()
        return
    sender = WeightSender(
        redis.Redis.from_url(redis_url), "stream-test", meta_params(model), bucket_mb=0.004,
        timeout_s=10, wire_dtype=torch.bfloat16,
    )  # fmt: skip
    order: list[str] = []

    def recorded():
        for name, tensor in policy.gather_weights():
            order.append(name)
            yield name, tensor

    stats = sender.broadcast(1, recorded())
    whole = FlatBuffers(sender.layout)
    whole.pack(dict(policy.gather_weights()), cast=True)
    ranks.send("stop")
    sender.close()
    result = {
        "layout_dtypes": sorted({str(b.dtype) for b in sender.layout.buckets}),
        "buckets": len(sender.layout.buckets),
        "order": order,
        "model_order": [n for n, _ in model.named_parameters()],
        "streamed_checksum": stats.checksum,
        "whole_checksum": whole.checksum(),
        "staging_bytes": stats.staging_bytes,
        "depth": sender.depth,
        "bucket_bytes": max(b.nbytes for b in sender.layout.buckets),
        "total_bytes": sender.layout.total_bytes,
    }
    (out / "result.json").write_text(json.dumps(result))
    ranks.barrier()
    ranks.close()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2])
