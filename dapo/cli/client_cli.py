"""``dapo run / runs / status / stop / pause / resume``: the control API from the shell.

``add_client_commands(subparsers)`` registers the subcommands on the ``dapo``
parser. Only argparse is imported here; the HTTP client and the config loader
are imported inside the handlers so ``dapo --help`` stays instant.

The API address comes from ``--api``, else ``DAPO_API_URL``, else
http://127.0.0.1:8000; the token from ``--token``, else ``DAPO_API_TOKEN``.
Exit codes: 0 done, 1 the API refused or could not be reached, 2 invalid config.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

DEFAULT_API_URL = "http://127.0.0.1:8000"


def _api_args() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--api", default=None, help=f"control API URL (env DAPO_API_URL, default {DEFAULT_API_URL})"
    )
    common.add_argument("--token", default=None, help="bearer token (env DAPO_API_TOKEN)")
    return common


def _client(args: argparse.Namespace):
    from dapo.cli.client import DapoClient

    url = args.api or os.environ.get("DAPO_API_URL") or DEFAULT_API_URL
    return DapoClient(url, token=args.token or os.environ.get("DAPO_API_TOKEN") or None)


def _guarded(action: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn API and config errors into a message on stderr and an exit code."""

    def handler(args: argparse.Namespace) -> int:
        from dapo.cli.client import ApiError
        from dapo.runtime.config import ConfigError

        try:
            return action(args)
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return 2
        except ApiError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    handler.__name__ = action.__name__
    return handler


def _print_state(state: dict) -> None:
    print(
        f"{state['run_id']}  {state['status']}  step {state['step']}  "
        f"version {state['policy_version']}"
    )


@_guarded
def cmd_run(args: argparse.Namespace) -> int:
    from dapo.runtime.config import load_run_spec

    spec = load_run_spec(args.config, args.overrides)  # fail here, before any request
    with _client(args) as api:
        state = api.start_run(spec)
    _print_state(state)
    return 0


@_guarded
def cmd_runs(args: argparse.Namespace) -> int:
    import time

    with _client(args) as api:
        runs = api.list_runs()
    if args.json:
        print(json.dumps(runs, indent=2))
        return 0
    print(f"{'RUN ID':<40} {'STATUS':<10} {'STEP':>6} {'VERSION':>8}  CREATED")
    for r in runs:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created_at"]))
        print(
            f"{r['run_id']:<40} {r['status']:<10} {r['step']:>6} "
            f"{r['policy_version']:>8}  {created}"
        )
    return 0


@_guarded
def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as api:
        print(json.dumps(api.status(args.run_id), indent=2))
    return 0


def _transition(name: str) -> Callable[[argparse.Namespace], int]:
    def action(args: argparse.Namespace) -> int:
        with _client(args) as api:
            _print_state(getattr(api, name)(args.run_id))
        return 0

    action.__name__ = f"cmd_{name}"
    return _guarded(action)


cmd_stop = _transition("stop")
cmd_pause = _transition("pause")
cmd_resume = _transition("resume")


def add_client_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register run/runs/status/stop/pause/resume on the ``dapo`` subparsers."""
    common = _api_args()
    run = subparsers.add_parser(
        "run", parents=[common], help="start a run on the control API (validated locally first)"
    )
    run.add_argument("--config", "-c", required=True, help="run spec YAML (or a configs/ name)")
    run.add_argument("overrides", nargs="*", help="section.field=value overrides")
    run.set_defaults(func=cmd_run)

    runs = subparsers.add_parser("runs", parents=[common], help="list the runs")
    runs.add_argument("--json", action="store_true", help="print the raw JSON list")
    runs.set_defaults(func=cmd_runs)

    helps = {
        "status": ("show a run: state, metrics, sampler account, final checkpoint", cmd_status),
        "stop": ("stop a run gracefully (final checkpoint, then stopped)", cmd_stop),
        "pause": ("pause a running run", cmd_pause),
        "resume": ("resume a paused run", cmd_resume),
    }
    for name, (text, func) in helps.items():
        p = subparsers.add_parser(name, parents=[common], help=text)
        p.add_argument("run_id", help="run identifier (see `dapo runs`)")
        p.set_defaults(func=func)
