"""``dapo plan``: memory and bytes of a run on a cluster shape, before anything starts.

Registered by ``dapo.cli.main``; this module imports only the standard library at import
time, so ``dapo --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys

CLUSTER_FLAGS = {  # flag -> (ClusterShape field, type, help)
    "--learner-gpus": ("learner_gpus", int, "learner GPUs in all (FSDP ranks)"),
    "--learner-nodes": ("learner_nodes", int, "learner nodes (pods); divides --learner-gpus"),
    "--gpu-memory-gib": ("gpu_memory_gib", float, "memory of one GPU, GiB"),
    "--host-memory-gib": ("host_memory_gib", float, "host memory of one learner node, GiB"),
    "--rollout-gpus": ("rollout_gpus", int, "rollout GPUs in all"),
    "--tensor-parallel-size": ("tensor_parallel_size", int, "GPUs per rollout engine"),
    "--rollout-max-prompts": (
        "rollout_max_prompts",
        int,
        "prompt tasks a worker generates together",
    ),
    "--rollout-max-batch-rows": ("rollout_max_batch_rows", int, "cap on sequences decoded at once"),
    "--reward-replicas": ("reward_replicas", int, "reward pods"),
    "--bandwidth-gb-s": ("bandwidth_gb_s", float, "learner-to-rollout bandwidth, GB/s"),
    "--process-overhead-gib": (
        "process_overhead_gib",
        float,
        "host memory of a bare learner process",
    ),
}
WORKLOAD_FLAGS = {
    "--prompt-tokens": ("prompt_tokens", int, "prompt tokens per sample (default: the spec's max)"),
    "--response-tokens": ("response_tokens", int, "response tokens per sample (default: the max)"),
    "--keep-rate": ("keep_rate", float, "share of groups dynamic sampling keeps (default 1)"),
}
SECTIONS = (  # plan section, title, rows (key, label)
    (
        "learner_gpu",
        "learner GPU (one FSDP rank)",
        (
            ("params", "parameter shard (model.dtype)"),
            ("grads", "gradient shard"),
            ("optimizer", "AdamW moments shard"),
            ("weight_sync", "weight-sync buckets (rank 0)"),
            ("gathered", "gathered layers and root"),
            ("activations", "activations, one micro-batch"),
            ("transient", "largest transient (head chunk, backward)"),
            ("total", "total"),
            ("capacity", "GPU memory"),
            ("activations_full", "(activations without checkpointing)"),
            ("activations_checkpointed", "(activations with checkpointing)"),
        ),
    ),
    (
        "learner_host",
        "learner host (one node)",
        (
            ("packed_batch", "packed batch, per rank"),
            ("rank0", "rank 0"),
            ("rank", "each other rank"),
            ("node", "total"),
            ("capacity", "host memory"),
        ),
    ),
    (
        "rollout_gpu",
        "rollout GPU (first GPU of a worker)",
        (
            ("weights", "engine weights (wire dtype)"),
            ("kv_cache", "KV cache, all sequences full"),
            ("receiver", "weight receiver buffers"),
            ("total", "total"),
            ("capacity", "GPU memory"),
            ("sequences", "(sequences decoded at once)"),
            ("sequences_fit", "(of which fit at full length)"),
        ),
    ),
    (
        "redis",
        "Redis",
        (
            ("stream.prompts", "prompts stream"),
            ("stream.rollouts", "rollouts stream"),
            ("stream.scored", "scored stream"),
            ("stream.batches", "batches stream"),
            ("data", "data"),
            ("maxmemory", "maxmemory"),
            ("limit", "memory limit"),
            ("aof_volume", "AOF volume"),
        ),
    ),
)


COUNTS = ("sequences", "sequences_fit")
"""Rows of the table that count sequences, not GiB."""


def add_plan_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``plan`` on the ``dapo`` subparsers."""
    p = subparsers.add_parser("plan", help="memory per GPU, host, Redis and weight bytes of a run")
    p.add_argument("--config", "-c", default=None, help="run spec YAML (or a configs/ name)")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides")
    p.add_argument(
        "--model-config",
        default=None,
        help="the model's config.json (or its folder); default: model.path's",
    )
    for flags in (CLUSTER_FLAGS, WORKLOAD_FLAGS):
        for flag, (_, kind, text) in flags.items():
            p.add_argument(flag, type=kind, default=None, help=text)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--values", action="store_true", help="print the Helm values that follow it")
    p.set_defaults(func=cmd_plan)


def _given(args: argparse.Namespace, flags: dict) -> dict:
    """The fields of the flags given on the command line (the others keep their defaults)."""
    return {
        field: getattr(args, flag[2:].replace("-", "_"))
        for flag, (field, _, _) in flags.items()
        if getattr(args, flag[2:].replace("-", "_")) is not None
    }


def _invalid(what: str, exc) -> int:
    lines = [
        f"  {'.'.join(map(str, e['loc'])) + ': ' if e['loc'] else ''}"
        f"{e['msg'].removeprefix('Value error, ')}"
        for e in exc.errors()
    ]
    print(f"invalid {what}:\n" + "\n".join(lines), file=sys.stderr)
    return 2


def cmd_plan(args: argparse.Namespace) -> int:
    """Print the plan (table, JSON or Helm values); 2 with the reason on a bad input."""
    from pydantic import ValidationError

    from dapo.runtime.config import ConfigError, load_run_spec
    from dapo.sizing import ClusterShape, Workload, chart_values, load_model_shape, make_plan

    try:
        spec = load_run_spec(args.config, args.overrides)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        cluster = ClusterShape(**_given(args, CLUSTER_FLAGS))
    except ValidationError as exc:
        return _invalid("cluster shape", exc)
    try:
        workload = Workload(**_given(args, WORKLOAD_FLAGS))
    except ValidationError as exc:
        return _invalid("workload", exc)
    try:
        model = load_model_shape(args.model_config or _model_dir(spec))
    except (OSError, ValueError) as exc:
        print(f"model shape: {exc}", file=sys.stderr)
        return 2
    plan = make_plan(spec, model, cluster, workload)
    if args.values:
        import yaml

        print(yaml.safe_dump(chart_values(plan, cluster), sort_keys=False), end="")
    elif args.json:
        print(json.dumps(plan, indent=2))
    else:
        print(render(plan, spec.name, cluster))
    return 0


def _model_dir(spec):
    from dapo.data.models import resolve_model_dir

    return resolve_model_dir(spec.model, None)


def render(plan: dict, name: str, cluster) -> str:
    """The plan as a readable table (GiB), its assumptions first and its warnings last."""
    w, m = plan["workload"], plan["model"]
    lines = [
        f"plan of {name}: {m['params']:,.0f} parameters; {cluster.learner_gpus} learner "
        f"GPUs on {cluster.learner_nodes} node(s), {cluster.rollout_gpus} rollout GPUs "
        f"(tp {cluster.tensor_parallel_size}), {cluster.gpu_memory_gib:g} GiB per GPU",
        f"samples of {w['prompt_tokens']:.0f} prompt + {w['response_tokens']:.0f} response "
        f"tokens, keep rate {w['keep_rate']:g}",
    ]
    for section, title, rows in SECTIONS:
        lines.append(f"\n{title:<44} {'GiB':>10}")
        for key, label in rows:
            value = plan[section][key]
            shown = f"{value:.0f}" if key in COUNTS else _number(value)
            lines.append(f"  {label:<42} {shown:>10}")
    r, wt = plan["redis"], plan["weights"]
    entries = ", ".join(
        f"{k} {r[f'entries.{k}']:.0f} x {r[f'entry_mib.{k}']:.3g} MiB"
        for k in ("prompts", "rollouts", "scored", "batches")
    )
    lines.append(f"  (entries: {entries})")
    lines.append(
        f"\nweights per update: {wt['update_gib']:.2f} GiB, {wt['update_s']:.1f} s at "
        f"{wt['bandwidth_gb_s']:g} GB/s"
    )
    lines += [f"warning: {text}" for text in plan["warnings"]]
    return "\n".join(lines)


def _number(value: float) -> str:
    """Two decimals, or three significant digits below 0.1 (small runs stay readable)."""
    return f"{value:.2f}" if value >= 0.1 or value == 0 else f"{value:.3g}"
