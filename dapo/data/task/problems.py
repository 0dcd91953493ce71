"""Synthetic integer-answer arithmetic problems in the DAPO-Math / verl schema.

A problem is ``a+b=`` or ``a-b=`` with small non-negative operands; the
expected response is the single line ``Answer: <n>`` followed by EOS, which the
official DAPO scorer grades (it reads the last ``Answer:`` line). Train and
validation splits are disjoint sets of problems drawn from one seeded shuffle.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

DATA_SOURCE = "dapo_default_arith"
ABILITY = "arithmetic"

Op = Literal["+", "-"]


@dataclass(frozen=True)
class Problem:
    """One problem ``a <op> b``; subtraction keeps a >= b so answers are >= 0."""

    a: int
    op: Op
    b: int

    @property
    def text(self) -> str:
        return f"{self.a}{self.op}{self.b}="

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b


def response_text(answer: int | str) -> str:
    """The target response (EOS is appended by whoever tokenizes it)."""
    return f"Answer: {answer}"


def all_problems(max_operand: int, ops: tuple[Op, ...]) -> list[Problem]:
    """Every problem with operands in [0, max_operand], in a fixed order."""
    out: list[Problem] = []
    for op in ops:
        for a in range(max_operand + 1):
            for b in range(max_operand + 1):
                if op == "-" and b > a:
                    continue
                out.append(Problem(a, op, b))
    return out


def split_problems(
    problems: list[Problem], n_val: int, n_train: int | None, seed: int
) -> tuple[list[Problem], list[Problem]]:
    """Shuffle once with ``seed``; the first n_val are validation, the next n_train train."""
    if n_val >= len(problems):
        raise ValueError(f"n_val={n_val} leaves no training problems out of {len(problems)}")
    order = list(problems)
    random.Random(seed).shuffle(order)
    val = order[:n_val]
    rest = order[n_val:]
    train = rest if n_train is None else rest[:n_train]
    return train, val


def to_row(problem: Problem, index: int, split: str) -> dict[str, Any]:
    """One dataset row in the verl schema."""
    return {
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "user", "content": problem.text}],
        "ability": ABILITY,
        "reward_model": {"style": "rule", "ground_truth": str(problem.answer)},
        "extra_info": {"index": index, "split": split},
    }


def write_parquet(problems: list[Problem], split: str, path: Path) -> None:
    """Write ``problems`` as a parquet file of verl-schema rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [to_row(p, i, split) for i, p in enumerate(problems)]
    pq.write_table(pa.Table.from_pylist(rows), str(path))
