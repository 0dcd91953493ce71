"""``dapo score``: score JSONL responses against their ground truths.

Input: one JSON object per line with string fields ``response`` and
``ground_truth`` (other fields are ignored); blank lines are skipped. Output:
one JSON object per scored input line, in input order, with ``score``,
``acc``, ``pred`` and ``reason`` (see :class:`dapo.reward.verify.Verdict`).

Lines are scored as they are read. The first malformed line (invalid JSON, not
an object, a missing or non-string field) stops the run: its line number and
the problem go to stderr, nothing is written for it, and the exit code is 2.
The lines before it have already been written whole.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Iterator
from typing import IO

from dapo.reward.verify import verify
from proto.vocab import REWARD_MODES

EXIT_BAD_INPUT = 2
_FIELDS = ("response", "ground_truth")


class InputLineError(ValueError):
    """A malformed input line; ``str()`` names the line number and the problem."""

    def __init__(self, lineno: int, problem: str) -> None:
        super().__init__(f"line {lineno}: {problem}")
        self.lineno = lineno
        self.problem = problem


def parse_line(line: str, lineno: int) -> tuple[str, str]:
    """(response, ground_truth) of one JSONL line, or InputLineError."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputLineError(lineno, f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise InputLineError(lineno, f"expected a JSON object, got {type(obj).__name__}")
    for key in _FIELDS:
        if key not in obj:
            raise InputLineError(lineno, f"missing key {key!r}")
        if not isinstance(obj[key], str):
            raise InputLineError(lineno, f"{key!r} must be a string, got {type(obj[key]).__name__}")
    return obj["response"], obj["ground_truth"]


def score_lines(lines: Iterable[str | bytes], mode: str, timeout_s: float) -> Iterator[dict]:
    """Yield one result record per non-blank line; raises InputLineError at a bad one.

    Byte lines are decoded here (UTF-8) so an undecodable line is reported by number.
    """
    for lineno, line in enumerate(lines, start=1):
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputLineError(lineno, f"not valid UTF-8 (byte {exc.start})") from None
        if not line.strip():
            continue
        response, ground_truth = parse_line(line, lineno)
        v = verify(response, ground_truth, mode=mode, timeout_s=timeout_s)  # type: ignore[arg-type]
        yield {"score": v.score, "acc": v.acc, "pred": v.pred, "reason": v.reason}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dapo score",
        description="Score JSONL lines {response, ground_truth} with the rule-based verifier.",
    )
    parser.add_argument("file", nargs="?", help="input JSONL (default: stdin)")
    parser.add_argument(
        "--mode", choices=REWARD_MODES, default="dapo", help="verifier (default: dapo)"
    )
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=2.0,
        help="bound on one verification in seconds (default: 2.0)",
    )
    parser.add_argument("-o", "--output", help="output JSONL (default: stdout)")
    return parser


def _run(source: IO, sink: IO[str], mode: str, timeout_s: float) -> None:
    # ASCII-escaped output: a lone surrogate in the input cannot break the encoder.
    for record in score_lines(source, mode, timeout_s):
        sink.write(json.dumps(record) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Entry of ``dapo score``; returns the exit code (argparse exits 2 on bad options)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (math.isfinite(args.timeout_s) and args.timeout_s > 0):
        parser.error(f"--timeout-s must be a finite number > 0, got {args.timeout_s}")
    stdin = getattr(sys.stdin, "buffer", sys.stdin)
    try:
        source = stdin if args.file is None else open(args.file, "rb")  # noqa: SIM115
    except OSError as exc:
        print(f"dapo score: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        if args.output is None:
            _run(source, sys.stdout, args.mode, args.timeout_s)
            sys.stdout.flush()
        else:
            with open(args.output, "w", encoding="utf-8") as sink:
                _run(source, sink, args.mode, args.timeout_s)
    except InputLineError as exc:
        where = "<stdin>" if args.file is None else args.file
        print(f"dapo score: {where}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        if source is not stdin:
            source.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
