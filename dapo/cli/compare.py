"""``dapo compare RUN_DIR...``: several runs on one picture, and their final figures.

A comparison is what an ablation is read from: the same panels as ``dapo plot`` with one
colour per run, and a table of what each run ended with (held-out accuracy before and
after, steps, training wall time, trained samples per second). The table is Markdown, so
it reads in a terminal and pastes into a report as it is.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from dapo.cli.plots import SMOOTHING, RunData, load_run, plot_runs

COLUMNS = (
    "run",
    "held-out before",
    "held-out after",
    "change",
    "steps",
    "train time (s)",
    "samples/s",
)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def final_figures(run: RunData) -> dict[str, object]:
    """One run's row: before/after from its first and last held-out evaluation (the summary
    when there is no evaluation record), the rest from summary.json or metrics.jsonl."""
    s = run.summary
    before = run.evals[0][1] if run.evals else s.get("acc_before")
    after = run.evals[-1][1] if len(run.evals) > 1 else s.get("acc_after")
    train_s = s.get("train_wall_s")
    if train_s is None and len(run.rows) > 1:
        train_s = round(float(run.rows[-1]["time"]) - run.origin(), 1)
    return {
        "run": run.label,
        "held-out before": before,
        "held-out after": after,
        "change": None if before is None or after is None else after - before,
        "steps": s.get("steps", len(run.rows)),
        "train time (s)": train_s,
        "samples/s": s.get("trained_samples_per_s"),
    }


def format_table(rows: Sequence[dict[str, object]], eval_key: str = "") -> str:
    """A Markdown table of ``final_figures`` rows."""
    header = [c if not c.startswith("held-out") or not eval_key else f"{c} ({eval_key})"
              for c in COLUMNS]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for row in rows:
        cells = []
        for col in COLUMNS:
            value = row.get(col)
            if col in ("held-out before", "held-out after"):
                cells.append(_pct(value))
            elif col == "change":
                cells.append("-" if value is None else f"{value * 100:+.1f} pt")
            else:
                cells.append("-" if value is None else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare(
    run_dirs: Sequence[Path], out: Path, *, x: str = "step", smooth: float = SMOOTHING
) -> tuple[Path, str]:
    """Draw the runs into ``out`` and return it with the table of final figures."""
    plot = plot_runs(run_dirs, out, x=x, smooth=smooth)
    runs = [load_run(Path(d)) for d in run_dirs]
    keys = {r.eval_key for r in runs if r.eval_key}
    table = format_table([final_figures(r) for r in runs], keys.pop() if len(keys) == 1 else "")
    return plot.path, table


def main(run_dirs: Sequence[str], out: str, x: str, smooth: float, table_file: str = "") -> int:
    """The table on stdout (and in ``table_file``), where the picture went on stderr."""
    dirs = [Path(d) for d in run_dirs]
    missing = [str(d) for d in dirs if not (d / "metrics.jsonl").is_file()]
    if missing:
        print(f"error: no training steps (metrics.jsonl) in {', '.join(missing)}", file=sys.stderr)
        return 2
    path, table = compare(dirs, Path(out), x=x, smooth=smooth)
    print(table)
    if table_file:
        Path(table_file).write_text(table + "\n")
    print(f"curves: {path}", file=sys.stderr)
    return 0
