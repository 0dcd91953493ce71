"""Throughput of the rule-based verifier on a realistic mix of responses.

10,000 synthetic responses (seeded): a few thousand characters of reasoning
each, ending in one of: a correct ``Answer:`` line, a wrong one, an answer with
a unit word or thousands separators, a ``\\boxed{}`` answer without an
``Answer:`` line, or no answer at all (a truncated generation).

Figures: ``reward.responses_per_s`` (default ``dapo`` mode, best of 3 passes)
and ``reward.boxed_responses_per_s`` (``boxed`` mode, same data).
"""

from __future__ import annotations

import random
import time

from dapo.reward.verify import verify

N_RESPONSES = 10_000
PASSES = 3

_SENTENCES = [
    "Let $x$ be the number of apples, so the equation becomes $3x + 7 = 2x + 19$.",
    "We expand $(a+b)^2 = a^2 + 2ab + b^2$ and collect the terms.",
    "By the AM-GM inequality, $\\frac{a+b}{2} \\ge \\sqrt{ab}$ with equality iff $a = b$.",
    "Wait, that is not right; let me recompute the discriminant $b^2 - 4ac$.",
    "Therefore the remainder modulo $1000$ is what we need to find.",
    "Substituting back gives $\\frac{12}{5}$, which we double-check numerically.",
    "Hmm, perhaps it is easier to count the complement instead.",
    "The triangle has sides $5$, $12$ and $13$, so it is a right triangle.",
]


def _reasoning(rng: random.Random) -> str:
    target = rng.randint(1500, 4000)
    parts: list[str] = []
    size = 0
    while size < target:
        sentence = rng.choice(_SENTENCES)
        parts.append(sentence)
        size += len(sentence) + 1
    return "\n".join(parts)


def _ending(rng: random.Random, answer: int) -> str:
    kind = rng.random()
    if kind < 0.35:
        return f"\nAnswer: {answer}"
    if kind < 0.55:
        return f"\nAnswer: {answer + rng.randint(1, 9)}"
    if kind < 0.65:
        return f"\nAnswer: {answer} {rng.choice(['meters', 'cm', 'dollars', 'degrees'])}"
    if kind < 0.72:
        return f"\nAnswer: ${answer:,}$"
    if kind < 0.85:
        return f"\nSo the final answer is $\\boxed{{{answer}}}$."
    return " and then we"  # truncated: no answer at all


def make_dataset(n: int = N_RESPONSES, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (response, ground_truth) pairs; the mix is described in the module doc."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        answer = rng.randint(0, 99_999)
        rows.append((_reasoning(rng) + _ending(rng, answer), str(answer)))
    return rows


def _rate(rows: list[tuple[str, str]], mode: str) -> float:
    best = float("inf")
    for _ in range(PASSES):
        start = time.perf_counter()
        for response, gt in rows:
            verify(response, gt, mode=mode)  # type: ignore[arg-type]
        best = min(best, time.perf_counter() - start)
    return len(rows) / best


def run() -> dict[str, float]:
    rows = make_dataset()
    return {
        "reward.responses_per_s": _rate(rows, "dapo"),
        "reward.boxed_responses_per_s": _rate(rows, "boxed"),
    }


if __name__ == "__main__":
    for name, value in run().items():
        print(f"{name}: {value:.1f}")
