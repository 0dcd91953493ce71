"""``dapo score`` CLI: in-process and as a subprocess, good input and every kind of bad line."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dapo.cli.score import main

REPO_ROOT = Path(__file__).resolve().parents[3]

ROWS = [
    {"response": "Thinking...\nAnswer: 42", "ground_truth": "42", "id": 1},
    {"response": "Answer: 5 meters", "ground_truth": "6"},
    {"response": "no answer here", "ground_truth": "1"},
    {"response": "so \\boxed{1,000}", "ground_truth": "1000"},
]
EXPECTED_DAPO = [
    {"score": 1.0, "acc": True, "pred": "42", "reason": "ok"},
    {"score": -1.0, "acc": False, "pred": "5", "reason": "mismatch"},
    {"score": -1.0, "acc": False, "pred": "", "reason": "no_answer"},
    {"score": -1.0, "acc": False, "pred": "", "reason": "no_answer"},
]


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _read_jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_file_to_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(_jsonl(ROWS))
    assert main([str(src)]) == 0
    out = capsys.readouterr()
    assert _read_jsonl(out.out) == EXPECTED_DAPO
    assert out.err == ""


def test_boxed_mode_to_output_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(_jsonl(ROWS))
    assert main([str(src), "--mode", "boxed", "-o", str(dst)]) == 0
    assert capsys.readouterr().out == ""
    results = _read_jsonl(dst.read_text())
    assert [r["reason"] for r in results] == ["no_answer", "no_answer", "no_answer", "ok"]
    assert results[3] == {"score": 1.0, "acc": True, "pred": "1000", "reason": "ok"}


def test_stdin_and_blank_lines(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    text = "\n" + _jsonl(ROWS[:2]) + "   \n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    assert main([]) == 0
    assert _read_jsonl(capsys.readouterr().out) == EXPECTED_DAPO[:2]


def test_math_verify_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(_jsonl([{"response": "Answer: 0.5", "ground_truth": "\\frac{1}{2}"}]))
    assert main([str(src), "--mode", "math_verify", "--timeout-s", "3"]) == 0
    assert _read_jsonl(capsys.readouterr().out) == [
        {"score": 1.0, "acc": True, "pred": "0.5", "reason": "ok"}
    ]


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        (b'{"response": "Answer: 1", "ground_truth": ', "invalid JSON"),
        (b'["Answer: 1", "1"]', "expected a JSON object, got list"),
        (b'{"response": "Answer: 1"}', "missing key 'ground_truth'"),
        (b'{"ground_truth": "1"}', "missing key 'response'"),
        (
            b'{"response": "Answer: 1", "ground_truth": 1}',
            "'ground_truth' must be a string, got int",
        ),
        (b'{"response": null, "ground_truth": "1"}', "'response' must be a string, got NoneType"),
        (b'{"response": "\xff", "ground_truth": "1"}', "not valid UTF-8"),
    ],
)
def test_malformed_line_names_line_number(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bad_line: bytes, problem: str
) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(
        _jsonl(ROWS[:2]).encode() + b"\n" + bad_line + b"\n" + _jsonl(ROWS[2:]).encode()
    )
    assert main([str(src)]) == 2
    out = capsys.readouterr()
    # Line 3 is blank, the bad line is line 4; only the two good lines before it were written.
    assert _read_jsonl(out.out) == EXPECTED_DAPO[:2]
    assert "line 4:" in out.err and problem in out.err and str(src) in out.err


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "nope.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_bad_options_exit_2() -> None:
    for argv in (["--mode", "exact"], ["--timeout-s", "0"], ["--timeout-s", "nan"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2


def _run_module(args: list[str], stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "dapo.cli.score", *args],
        input=stdin,
        capture_output=True,
        cwd=REPO_ROOT,
        timeout=120,
        check=False,
    )


def test_subprocess_stdin_to_stdout() -> None:
    proc = _run_module([], _jsonl(ROWS).encode())
    assert proc.returncode == 0, proc.stderr
    assert _read_jsonl(proc.stdout.decode()) == EXPECTED_DAPO


def test_subprocess_malformed_line(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    stdin = _jsonl(ROWS[:1]).encode() + b"not json\n" + _jsonl(ROWS[1:]).encode()
    proc = _run_module(["-o", str(out)], stdin)
    assert proc.returncode == 2
    assert b"<stdin>: line 2: invalid JSON" in proc.stderr
    assert _read_jsonl(out.read_text()) == EXPECTED_DAPO[:1]


def test_subprocess_math_verify_mode() -> None:
    rows = [
        {"response": "Answer: $\\sqrt{8}$", "ground_truth": "2\\sqrt{2}"},
        {"response": "Answer: 3", "ground_truth": "4"},
    ]
    proc = _run_module(["--mode", "math_verify"], _jsonl(rows).encode())
    assert proc.returncode == 0, proc.stderr
    assert [r["acc"] for r in _read_jsonl(proc.stdout.decode())] == [True, False]
