"""Verifier tests: DAPO reference behaviour case by case, boxed and math_verify modes, time bounds."""

from __future__ import annotations

import re
import signal
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dapo.reward import verify as verify_module
from dapo.reward.normalize import (
    REMOVED_EXPRESSIONS,
    SUBSTITUTIONS,
    extract_answer_line,
    last_boxed_content,
    normalize_final_answer,
)
from dapo.reward.verify import TAIL_CHARS, Verdict, verify

FILLER = "We expand the product and collect terms; the sum telescopes. "

# (response, ground_truth, correct, pred) -- expectations derived by hand from the
# published rules: regex (?i)Answer\s*:\s*([^\n]+), last match, Minerva normalisation.
DAPO_CASES = [
    ("Answer: 42", "42", True, "42"),
    (FILLER * 3 + "\nAnswer: 42", "42", True, "42"),
    ("Answer: 41", "42", False, "41"),
    # Markup: the capture is "** 42" -> "**42"; the reference does not strip asterisks.
    ("**Answer:** 42", "42", False, "**42"),
    ("**Answer: 42**", "42", False, "42**"),
    # A trailing period survives unless it sits before a closing "$".
    ("Answer: 42.", "42", False, "42."),
    ("Answer: $42.$", "42", True, "42"),
    ("Answer: 5 meters", "5", True, "5"),
    ("Answer: 5\\text{ cm}", "5", True, "5"),
    ("Answer: 6 square units", "6", True, "6"),
    ("Answer: 12 dollars", "12", True, "12"),
    ("Answer: \\$5", "5", True, "5"),
    ("Answer: 1,000", "1000", True, "1000"),
    ("Answer: 1000", "1,000", True, "1000"),
    ("Answer: 1,\\!000", "1000", True, "1000"),
    ("Answer: -1,000", "-1000", False, "-1,000"),
    # Commas go whenever the rest is digits, so a list of digits collapses too.
    ("Answer: 123", "1, 2, 3", True, "123"),
    ("Answer: $42$", "42", True, "42"),
    ("Answer: \\boxed{42}", "42", True, "42"),
    ("Answer: $\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}", True, "\\frac{1}{2}"),
    ("ANSWER: 42", "42", True, "42"),
    ("answer : 42", "42", True, "42"),
    ("answer:42", "42", True, "42"),
    ("Final Answer: 42", "42", True, "42"),
    ("Answer: 41\nWait, let me recheck.\nAnswer: 42", "42", True, "42"),
    ("Answer: 42\nHmm, no.\nAnswer: 41", "42", False, "41"),
    ("Answer: -7", "-7", True, "-7"),
    ("Answer: -7", "7", False, "-7"),
    ("Answer: \\frac{3}{4}", "\\frac{3}{4}", True, "\\frac{3}{4}"),
    ("Answer: \\frac34", "\\frac{3}{4}", True, "\\frac{3}{4}"),
    ("Answer: \\dfrac{3}{4}", "\\frac{3}{4}", False, "\\dfrac{3}{4}"),
    ("Answer: 3/4", "\\frac{3}{4}", False, "3/4"),
    ("Answer: 0.5", "\\frac{1}{2}", False, "0.5"),
    ("Answer: \\sqrt2", "\\sqrt{2}", True, "\\sqrt{2}"),
    ("Answer: x = 5", "5", True, "5"),
    ("Answer: $x = 5$", "5", True, "5"),
    ("Answer: 90^\\circ", "90", True, "90"),
    ("Answer: 90^{\\circ}", "90", True, "90"),
    ("Answer: 90 degrees", "90", True, "90"),
    ("Answer: \\text{(B)}", "(B)", True, "(B)"),
    ("Answer: \\mbox{5}", "5", True, "5"),
    ("Answer: 10\\%", "10", False, "10\\%"),
    # \left / \right are not in the reference lists.
    ("Answer: \\left( 1, 2 \\right)", "(1,2)", False, "\\left(1,2\\right)"),
    ("Answer: 3 \nThat is all.", "3", True, "3"),
    ("Answer: 4", " 4\n", True, "4"),
    # Newline right after the colon: \s* eats it, so the next line is the answer.
    ("Answer:\n42", "42", True, "42"),
    ("Answer:\n\n42", "42", True, "42"),
    # Only spaces after the colon: \s* backtracks and [^\n]+ takes one space -> "".
    ("Answer: ", "42", False, ""),
]


@pytest.mark.parametrize(("response", "gt", "correct", "pred"), DAPO_CASES)
def test_dapo_cases(response: str, gt: str, correct: bool, pred: str) -> None:
    v = verify(response, gt)
    assert v == Verdict(1.0 if correct else -1.0, correct, pred, "ok" if correct else "mismatch")


@pytest.mark.parametrize(
    "response",
    ["", "The answer is 42.", "Answer:", "Answer:\n", "Answer:\n\n", "no colon Answer 42"],
)
def test_dapo_no_answer(response: str) -> None:
    assert verify(response, "42") == Verdict(-1.0, False, "", "no_answer")


def test_answer_outside_last_300_chars_does_not_count() -> None:
    tail = ("x" * 59 + "\n") * 5  # 300 characters without an answer line
    assert len(tail) == TAIL_CHARS
    assert verify("Answer: 42\n" + tail, "42").reason == "no_answer"
    # An earlier line outside the window cannot override the last one inside it either.
    assert verify("Answer: 42\n" + tail + "Answer: 7", "42").pred == "7"


def test_window_boundary_is_exact() -> None:
    head = "Answer: 42\n"  # 11 characters
    inside = head + "y" * (TAIL_CHARS - len(head))
    cut = head + "y" * (TAIL_CHARS - len(head) + 1)  # the window starts at "nswer"
    assert verify(inside, "42").acc
    assert verify(cut, "42").reason == "no_answer"


@given(
    n=st.integers(-(10**12), 10**12), filler=st.text(alphabet="abcdefxyz +-*/().,\n", max_size=400)
)
@settings(max_examples=100, deadline=None)
def test_integer_answers_property(n: int, filler: str) -> None:
    # Filler cannot spell "answer", so the last line decides. Thousands separators are
    # dropped only when the rest is all digits, so not for negative numbers.
    shown = f"{n:,}" if n >= 0 else str(n)
    v = verify(filler + f"\nAnswer: {shown}", str(n))
    assert v.acc and v.score == 1.0 and v.pred == str(n)
    wrong = verify(filler + f"\nAnswer: {n + 1}", str(n))
    assert not wrong.acc and wrong.score == -1.0


# ---------------------------------------------------------------- normalisation


def _reference_normalize(text: str) -> str:
    """The published procedure written with its regular expressions: a test oracle."""
    text = text.split("=")[-1]
    for before, after in SUBSTITUTIONS:
        text = text.replace(before, after)
    for expr in REMOVED_EXPRESSIONS:
        text = text.replace(expr, "")
    steps = [
        (r"(.*?)(\$)(.*?)(\$)(.*)", r"$\3$"),
        (r"(\\text\{)(.*?)(\})", r"\2"),
        (r"(\\textbf\{)(.*?)(\})", r"\2"),
        (r"(\\overline\{)(.*?)(\})", r"\2"),
        (r"(\\boxed\{)(.*)(\})", r"\2"),
        (r"(frac)([^{])(.)", r"frac{\2}{\3}"),
        (r"(sqrt)([^{])", r"sqrt{\2}"),
    ]
    for pattern, repl in steps:
        text = re.sub(pattern, repl, text)
    text = text.replace("$", "")
    if text.replace(",", "").isdigit():
        text = text.replace(",", "")
    return text.strip()


TOKENS = [
    "$", "\\text{", "\\textbf{", "\\overline{", "\\boxed{", "{", "}", "\n", " ", "frac",
    "sqrt", "1", "2", "a", "an ", ",", "=", "cm", ",\\!", ".", ".$", "x", "\\$", "^\\circ",
    "\\mbox{", "\\left(", "\\", "\\text{m}",
]  # fmt: skip


@given(st.lists(st.sampled_from(TOKENS), max_size=30))
@settings(max_examples=400, deadline=None)
def test_normalize_matches_published_regex_procedure(tokens: list[str]) -> None:
    text = "".join(tokens)
    assert normalize_final_answer(text) == _reference_normalize(text)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("\\text{\\text{a}}", "\\text{a}"),  # lazy match: the inner opener survives
        ("$1$ and $2$", "1"),  # only the first $...$ span of a line is kept
        ("\\boxed{1}+\\boxed{2}", "1}+\\boxed{2"),  # greedy: first opener to last brace
        ("\\fracab", "\\frac{a}{b}"),
        ("\\sqrtab", "\\sqrt{a}b"),
        ("1,234,567", "1234567"),
        ("1,234.5", "1,234.5"),
        ("x=y=3", "3"),
    ],
)
def test_normalize_specific_rules(raw: str, expected: str) -> None:
    assert normalize_final_answer(raw) == expected


def test_normalize_pathological_ground_truth_is_linear() -> None:
    # Quadratic scanning would take minutes here; the forward scans take milliseconds.
    hostile = "\\text{" * 200_000 + "$" + "\\boxed{" * 100_000
    assert normalize_final_answer(hostile) == hostile.replace("$", "")
    assert normalize_final_answer("\\text{a}" * 100_000) == "a" * 100_000


def test_extract_helpers() -> None:
    assert extract_answer_line("Answer: 1\nanswer: 2 \n") == "2 "
    assert extract_answer_line("nothing") is None
    assert (
        last_boxed_content("\\boxed{1} then \\boxed{\\frac{1}{\\sqrt{2}}}.")
        == "\\frac{1}{\\sqrt{2}}"
    )
    assert last_boxed_content("\\boxed{42") is None
    assert last_boxed_content("no box") is None


# ---------------------------------------------------------------- boxed mode


@pytest.mark.parametrize(
    ("response", "gt", "correct", "pred"),
    [
        ("So the result is \\boxed{42}.", "42", True, "42"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", True, "\\frac{1}{2}"),
        ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", True, "\\frac{\\sqrt{3}}{2}"),
        ("First \\boxed{41}, then \\boxed{42}", "42", True, "42"),
        ("\\boxed{42} but finally \\boxed{41}", "42", False, "41"),
        ("\\boxed{1,000}", "1000", True, "1000"),
        ("\\boxed{5 \\text{ cm}}", "5", True, "5"),
        ("\\boxed{\\text{(C)}}", "(C)", True, "(C)"),
    ],
)
def test_boxed_cases(response: str, gt: str, correct: bool, pred: str) -> None:
    v = verify(response, gt, mode="boxed")
    assert (v.acc, v.pred, v.score) == (correct, pred, 1.0 if correct else -1.0)


@pytest.mark.parametrize(
    "response", ["Answer: 42", "\\boxed{42", "", "\\boxed{42}\n" + "z" * TAIL_CHARS]
)
def test_boxed_no_answer(response: str) -> None:
    assert verify(response, "42", mode="boxed") == Verdict(-1.0, False, "", "no_answer")


# ---------------------------------------------------------------- math_verify mode


@pytest.mark.parametrize(
    ("response", "gt", "correct"),
    [
        ("Answer: 0.5", "\\frac{1}{2}", True),
        ("Answer: \\frac{1}{2}", "0.5", True),
        ("Answer: $\\sqrt{8}$", "2\\sqrt{2}", True),
        ("Thus \\boxed{\\frac{1}{2}}", "0.5", True),
        ("Answer: 5 meters", "5", True),  # agrees after normalisation: no sympy needed
        ("Answer: x = 5", "5", True),
        ("Answer: 3", "4", False),
        ("Answer: \\frac{1}{3}", "0.5", False),
    ],
)
def test_math_verify_cases(response: str, gt: str, correct: bool) -> None:
    v = verify(response, gt, mode="math_verify")
    assert v.acc is correct
    assert v.reason == ("ok" if correct else "mismatch")
    assert v.score == (1.0 if correct else -1.0)


def test_math_verify_no_answer() -> None:
    assert verify("I give up.", "1", mode="math_verify") == Verdict(-1.0, False, "", "no_answer")


def test_math_verify_prefers_answer_line_over_box() -> None:
    v = verify("\\boxed{7}\nAnswer: 0.5", "\\frac{1}{2}", mode="math_verify")
    assert v.acc and v.pred == "0.5"


def test_math_verify_pathological_input_times_out() -> None:
    verify("Answer: 1", "1", mode="math_verify")  # start the worker outside the measured call
    t0 = time.monotonic()
    v = verify("Answer: $(x+1)^{100000}$", "\\frac{1}{2}", mode="math_verify", timeout_s=0.5)
    elapsed = time.monotonic() - t0
    assert v == Verdict(-1.0, False, "$(x+1)^{100000}$", "timeout")
    assert elapsed < 30  # returned at all (sympy alone runs for minutes)
    # The worker still answers afterwards.
    assert verify("Answer: 0.5", "\\frac{1}{2}", mode="math_verify").acc


def test_worker_is_killed_when_its_timer_cannot_fire() -> None:
    worker = verify_module._DeadlineWorker()
    try:
        # Block SIGALRM inside the worker so only the parent's deadline can end the call.
        assert (
            worker.call(signal.pthread_sigmask, (signal.SIG_BLOCK, {signal.SIGALRM}), 5.0)[0]
            == "ok"
        )
        assert worker.call(time.sleep, (60,), 0.3) == ("timeout", None)
        assert worker.started == 1
        assert worker.call(pow, (2, 10), 5.0) == ("ok", 1024)  # a fresh process
        assert worker.started == 2
        assert worker.call(int, ("x",), 5.0) == ("error", "ValueError")
    finally:
        worker.close()


# ---------------------------------------------------------------- entry point


def test_verify_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError, match="response"):
        verify(None, "1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ground_truth"):
        verify("Answer: 1", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode"):
        verify("Answer: 1", "1", mode="exact")  # type: ignore[arg-type]
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="timeout_s"):
            verify("Answer: 1", "1", timeout_s=bad)


def test_verdict_is_frozen() -> None:
    v = verify("Answer: 1", "1")
    with pytest.raises(AttributeError):
        v.score = 0.0  # type: ignore[misc]
