"""Training curves of a run folder as a PNG, in the spirit of the paper's figures."""

from __future__ import annotations

import json
from pathlib import Path

PANELS = (
    ("acc_mean", "accuracy (train samples)"),
    ("reward_mean", "reward"),
    ("entropy", "entropy"),
    ("response_length_mean", "response length (tokens)"),
    ("kept_ratio", "kept-group ratio"),
    ("version_lag", "policy-version lag"),
)


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    if not rows:
        raise FileNotFoundError(f"{run_dir}/metrics.jsonl has no training steps to plot")
    out = out or Path(run_dir) / "curves.png"
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), constrained_layout=True)
    steps = [r["step"] for r in rows]
    for ax, (key, title) in zip(axes.flat, PANELS, strict=True):
        ys = [r.get(key) for r in rows]
        pts = [(s, y) for s, y in zip(steps, ys, strict=True) if y is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", markersize=3)
        ax.set_title(title)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    summary = Path(run_dir) / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        if "acc_before" in s and "acc_after" in s:
            fig.suptitle(f"held-out accuracy {s['acc_before']:.1%} -> {s['acc_after']:.1%}")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
