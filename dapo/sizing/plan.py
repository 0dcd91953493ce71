"""A run's plan: every figure of ``dapo plan`` from a run spec, a model shape, a cluster
shape and the workload's token lengths, with what does not fit said in words."""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field

from dapo.sizing import learner, redis, rollout
from dapo.sizing.shapes import DTYPE_BYTES, GIB, ClusterShape, ModelShape
from proto.runspec import RunSpec


class Workload(BaseModel):
    """Token lengths and keep rate the plan assumes; None takes the spec's bound."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    prompt_tokens: int | None = Field(None, ge=1, le=1 << 20)
    """Prompt tokens per sample; None: data.max_prompt_length."""
    response_tokens: int | None = Field(None, ge=1, le=1 << 20)
    """Response tokens per sample; None: data.max_response_length (the worst case)."""
    keep_rate: float = Field(1.0, gt=0.0, le=1.0)
    """Share of scored groups dynamic sampling keeps."""


def _gib(nbytes: float) -> float:
    return nbytes / GIB


def _learner_gpu(spec: RunSpec, model: ModelShape, cluster: ClusterShape, seq: int, resp: int):
    b_m = DTYPE_BYTES[spec.model.dtype]
    cast = spec.actor.fsdp_config.mixed_precision.compute_dtype is not None
    b_c = 2 if spec.actor.bf16_autocast or cast else b_m  # forward/backward dtype
    world, rows = cluster.learner_gpus, spec.actor.ppo_micro_batch_size
    parts = learner.sharded_state_bytes(model.num_params(), world, b_m)
    wire = wire_bytes(spec)
    parts["weight_sync"] = rollout.sender_buffer_bytes(model, wire, world == 1 and wire == b_m)
    # sharded: layers are gathered in bf16 only under mixed precision (autocast alone
    # gathers them at full width); one process: autocast's cache of bf16 weights
    b_g = (2 if cast else b_m) if world > 1 else b_c
    parts["gathered"] = learner.gathered_bytes(model, world, b_g)
    b_s = b_g if world > 1 else b_m  # the residual stream: cast with the parameters
    act = {
        ck: learner.activation_bytes(model, rows * seq, rows * resp, b_s, b_c, ck)
        for ck in (False, True)
    }
    ckpt = spec.model.enable_gradient_checkpointing
    parts["activations"] = act[ckpt]
    head = learner.head_chunk_bytes(rows, resp, model.vocab_size, b_c)
    parts["transient"] = learner.transient_bytes(model, rows * seq, head, b_c, ckpt)
    total = sum(parts.values())
    out = {k: _gib(v) for k, v in parts.items()}
    out |= {
        "activations_checkpointed": _gib(act[True]),
        "activations_full": _gib(act[False]),
        "total": _gib(total),
        "capacity": cluster.gpu_memory_gib,
    }
    return out


def _learner_host(spec: RunSpec, model: ModelShape, cluster: ClusterShape, seq, resp, batch):
    rows = spec.data.train_batch_size * spec.rollout.n
    packed = learner.packed_batch_bytes(rows, seq, resp)
    over = cluster.process_overhead_gib * GIB
    rank0 = over + learner.host_rank_bytes(batch, packed, rank0=True)
    rank0 += learner.host_rank0_extra_bytes(model, DTYPE_BYTES[spec.model.dtype])
    other = over + learner.host_rank_bytes(batch, packed, rank0=False)
    node0 = rank0 + (cluster.gpus_per_node - 1) * other
    return {
        "rank0": _gib(rank0),
        "rank": _gib(other),
        "packed_batch": _gib(packed),
        "node": _gib(node0),
        "capacity": cluster.host_memory_gib,
    }


def wire_bytes(spec: RunSpec) -> int:
    """Bytes per element on the wire: rollout.dtype for vLLM, model.dtype for HF."""
    return DTYPE_BYTES[spec.rollout.dtype if spec.rollout.engine == "vllm" else spec.model.dtype]


def _rollout_gpu(spec: RunSpec, model: ModelShape, cluster: ClusterShape, seq: int):
    # the engine computes in rollout.dtype (vLLM) or in the dtype it loaded (HF: model.dtype)
    b_r, tp = wire_bytes(spec), cluster.tensor_parallel_size
    seqs = rollout.concurrent_sequences(
        spec.rollout.n, cluster.rollout_max_prompts, cluster.rollout_max_batch_rows
    )
    parts = {
        "weights": rollout.engine_weight_bytes(model, b_r, tp),
        "kv_cache": rollout.kv_cache_bytes(model, b_r, tp, seqs, seq),
        "receiver": rollout.receiver_buffer_bytes(model, b_r, spec.rollout.engine == "hf"),
    }
    fit = rollout.sequences_that_fit(
        cluster.gpu_memory_gib * GIB, parts["weights"] + parts["receiver"], parts["kv_cache"] / seqs
    )
    out = {k: _gib(v) for k, v in parts.items()}
    return out | {
        "sequences": float(seqs),
        "sequences_fit": float(fit),
        "total": _gib(sum(parts.values())),
        "capacity": cluster.gpu_memory_gib,
    }


def _redis(spec: RunSpec, cluster: ClusterShape, prompt: int, resp: int, keep: float):
    sizes = redis.entry_sizes(spec, prompt, resp)
    entries = redis.stream_entries(spec, keep, cluster.rollout_workers, cluster.reward_replicas)
    streams = redis.stream_bytes(entries, sizes)
    data = float(sum(streams.values()))
    maxmemory = math.ceil(max(data, GIB) / GIB) * GIB  # whole GiB, at least one
    limit = redis.memory_limit_bytes(maxmemory, max(sizes.values()))
    out = {f"entries.{k}": float(v) for k, v in entries.items()}
    out |= {f"entry_mib.{k}": v / (1 << 20) for k, v in sizes.items()}
    out |= {f"stream.{k}": _gib(v) for k, v in streams.items()}
    out |= {
        "data": _gib(data),
        "maxmemory": _gib(maxmemory),
        "limit": _gib(limit),
        "aof_volume": _gib(redis.aof_volume_bytes(maxmemory)),
    }
    return out, sizes


def make_plan(
    spec: RunSpec, model: ModelShape, cluster: ClusterShape, workload: Workload | None = None
) -> dict:
    """Every figure of the plan (GiB unless the name says otherwise) and its warnings."""
    w = workload or Workload()
    prompt = w.prompt_tokens or spec.data.max_prompt_length
    resp = w.response_tokens or spec.data.max_response_length
    seq = prompt + resp
    red, sizes = _redis(spec, cluster, prompt, resp, w.keep_rate)
    update = rollout.update_bytes(model, wire_bytes(spec))
    plan = {
        "model": {"params": float(model.num_params()), "layers": float(model.num_layers)},
        "workload": {
            "prompt_tokens": float(prompt),
            "response_tokens": float(resp),
            "keep_rate": w.keep_rate,
        },
        "learner_gpu": _learner_gpu(spec, model, cluster, seq, resp),
        "learner_host": _learner_host(
            spec, model, cluster, seq, resp, redis.batch_bytes(spec, prompt, resp)
        ),
        "rollout_gpu": _rollout_gpu(spec, model, cluster, seq),
        "redis": red,
        "weights": {
            "update_gib": _gib(update),
            "bandwidth_gb_s": cluster.bandwidth_gb_s,
            "update_s": rollout.update_seconds(update, cluster.bandwidth_gb_s),
        },
    }
    plan["warnings"] = warnings(plan, sizes)
    return plan


def warnings(plan: dict, sizes: dict[str, int]) -> list[str]:
    """What does not fit, in words."""
    out = []
    for part, what in (("learner_gpu", "a learner GPU"), ("learner_host", "a learner node")):
        need = plan[part]["total" if part == "learner_gpu" else "node"]
        have = plan[part]["capacity"]
        if need > have:
            out.append(f"{what} needs {need:.1f} GiB, more than its {have:.1f} GiB")
    ro = plan["rollout_gpu"]
    if ro["sequences_fit"] < ro["sequences"]:
        out.append(
            f"a rollout GPU holds the KV cache of {ro['sequences_fit']:.0f} of the "
            f"{ro['sequences']:.0f} sequences a worker decodes at once at full length, after "
            f"{ro['weights'] + ro['receiver']:.1f} GiB of weights and receiver buffers (vLLM "
            "preempts and recomputes the others)"
        )
    for stream, size in sizes.items():
        if size > redis.MAX_ENTRY_BYTES:
            out.append(
                f"one {stream} entry is {size / (1 << 20):.0f} MiB, over the bus's "
                f"max_entry_bytes ({redis.MAX_ENTRY_BYTES >> 20} MiB; Redis's "
                f"proto-max-bulk-len is {redis.PROTO_MAX_BULK_LEN >> 20} MiB): publishing fails"
            )
    return out


def chart_values(plan: dict, cluster: ClusterShape) -> dict:
    """The Helm values (deploy/k8s) that follow the plan: Redis's maxmemory, memory limit and
    AOF volume, the learner's pods, GPUs and memory limit, the rollout pods, GPUs and
    tensor parallelism; memory in whole GiB, rounded up."""
    r, host = plan["redis"], plan["learner_host"]

    def gi(value: float) -> str:
        return f"{math.ceil(value - 1e-9)}Gi"

    return {
        "redis": {
            "maxmemory": gi(r["maxmemory"]),
            "resources": {"limits": {"memory": gi(r["limit"])}},
            "persistence": {"size": gi(r["aof_volume"])},
        },
        "learner": {
            "nodes": cluster.learner_nodes,
            "gpus": cluster.gpus_per_node,
            "resources": {"limits": {"memory": gi(host["node"])}},
        },
        "rollout": {
            "replicas": cluster.rollout_workers,
            "gpus": cluster.tensor_parallel_size,
            "maxPrompts": cluster.rollout_max_prompts,
            "maxBatchRows": cluster.rollout_max_batch_rows,
            "extraEnv": [
                {
                    "name": "DAPO_VLLM_TENSOR_PARALLEL_SIZE",
                    "value": str(cluster.tensor_parallel_size),
                }
            ],
        },
    }
