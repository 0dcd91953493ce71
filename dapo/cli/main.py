"""The ``dapo`` command. Heavy modules are imported inside each subcommand,
so ``dapo --help`` answers at once."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import get_args

from proto.vocab import REWARD_MODES, PromptTemplate

SERVICES = ("rollout", "reward", "sampler", "learner", "api")


def _cmd_up(args: argparse.Namespace) -> int:
    from dapo.cli.local import up

    return up(
        args.config,
        args.overrides,
        rollout_workers=args.rollout_workers,
        skip_eval=args.skip_eval,
        eval_n=args.eval_n,
    )


def _cmd_service(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"services.{args.name}.main")
    return int(module.main() or 0)


def _cmd_score(args: argparse.Namespace) -> int:
    from dapo.cli.score import main

    return main(args.rest)


def _cmd_eval(args: argparse.Namespace) -> int:
    from dapo.cli.evaluate import main

    return main(args)


def _cmd_prepare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dapo.data.task import prepare_default_task

    task = prepare_default_task(Path(args.cache_dir) if args.cache_dir else None, force=args.force)
    print(
        f"default task ready: model {task.model_dir} ({task.num_parameters:,} parameters, "
        f"base held-out accuracy {task.base_accuracy:.1%})"
    )
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dapo.cli.plots import plot_run

    out = Path(args.out) if args.out else None
    print(plot_run(Path(args.run_dir), out, x=args.x, smooth=args.smooth))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from dapo.cli.compare import main

    return main(args.run_dirs, args.out, args.x, args.smooth, args.table)


def _add_curve_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--x", choices=("step", "time"), default="step",
                   help="x axis: training step, or wall time since training started")  # fmt: skip
    p.add_argument("--smooth", type=float, default=0.9,
                   help="EMA weight in [0, 1) of the smoothed curves (0 = raw only)")  # fmt: skip


def _cmd_validate(args: argparse.Namespace) -> int:
    from dapo.runtime.config import ConfigError, load_run_spec

    try:
        spec = load_run_spec(args.config, args.overrides)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(spec.model_dump_json(indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dapo",
        description="Asynchronous DAPO reinforcement learning for LLMs over Redis streams.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="run the whole local stack: Redis + the four services")
    up.add_argument("--config", "-c", default="cpu-small", help="run spec YAML (configs/...)")
    up.add_argument("overrides", nargs="*", help="section.field=value overrides")
    up.add_argument("--rollout-workers", type=int, default=1, help="rollout processes")
    up.add_argument("--skip-eval", action="store_true", help="no before/after evaluation")
    up.add_argument("--eval-n", type=int, default=None, help="samples per eval problem")
    up.set_defaults(func=_cmd_up)

    svc = sub.add_parser("service", help="run one service (as a container does)")
    svc.add_argument("name", choices=SERVICES)
    svc.set_defaults(func=_cmd_service)

    score = sub.add_parser(
        "score", help="score JSONL responses with the reward verifier", add_help=False
    )
    score.add_argument("rest", nargs=argparse.REMAINDER)
    score.set_defaults(func=_cmd_score)

    ev = sub.add_parser("eval", help="evaluate a checkpoint on a dataset (avg@k)")
    ev.add_argument("--model", required=True, help="Hugging Face model directory")
    ev.add_argument("--data", required=True, help="parquet/JSONL file in the DAPO-Math schema")
    ev.add_argument("--n", type=int, default=4, help="samples per problem (k of avg@k)")
    ev.add_argument("--temperature", type=float, default=1.0)
    ev.add_argument("--top-p", type=float, default=0.7)
    ev.add_argument("--max-new-tokens", type=int, default=1024)
    ev.add_argument("--limit", type=int, default=0, help="only the first N problems (0 = all)")
    ev.add_argument("--batch", type=int, default=16, help="prompts per generation batch")
    ev.add_argument("--template", choices=get_args(PromptTemplate), default="none")
    ev.add_argument("--mode", choices=REWARD_MODES, default="dapo")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--json", action="store_true", help="print the figures as JSON")
    ev.set_defaults(func=_cmd_eval)

    prep = sub.add_parser("prepare", help="build the embedded default task (tiny model + data)")
    prep.add_argument("--cache-dir", default="", help="default: the repository's .cache/")
    prep.add_argument("--force", action="store_true")
    prep.set_defaults(func=_cmd_prepare)

    from dapo.cli.client_cli import add_client_commands  # standard library only: stays fast

    add_client_commands(sub)

    from dapo.cli.plan import add_plan_command  # standard library only: stays fast

    add_plan_command(sub)

    plot = sub.add_parser("plot", help="re-render a run folder's curves (curves.png)")
    plot.add_argument("run_dir")
    plot.add_argument("--out", "-o", default="", help="PNG to write (default RUN_DIR/curves.png)")
    _add_curve_options(plot)
    plot.set_defaults(func=_cmd_plot)

    cmp = sub.add_parser("compare", help="overlay runs on one PNG and tabulate final figures")
    cmp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    cmp.add_argument("--out", "-o", default="compare.png", help="PNG to write")
    cmp.add_argument("--table", default="", help="also write the Markdown table to this file")
    _add_curve_options(cmp)
    cmp.set_defaults(func=_cmd_compare)

    val = sub.add_parser("validate", help="validate a run spec and print it resolved")
    val.add_argument("--config", "-c", default=None)
    val.add_argument("overrides", nargs="*")
    val.set_defaults(func=_cmd_validate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
