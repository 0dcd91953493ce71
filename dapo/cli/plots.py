"""Training curves of one run or several on one picture (``dapo plot``, ``dapo compare``).

Per-step figures are noisy at any scale (a batch is a few hundred samples), so each panel
draws the raw series faint and an exponential moving average over it, debiased at the
start as TensorBoard's smoothing is, which is what the eye needs to compare runs. Held-out
accuracy comes from the evaluations ``dapo up`` makes (before, every ``trainer.test_freq``
steps, after: ``evals.jsonl``; older runs only have ``summary.json``'s before and after).
The x axis is the training step, or wall time since training started, which is the fair
axis where runs differ in what a step costs (asynchrony, dynamic sampling).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

EVALS_FILE = "evals.jsonl"
"""One line per held-out evaluation of a run: its training step, kind and figures."""

SMOOTHING = 0.9
"""Default EMA weight of the previous value (TensorBoard's slider)."""

LAG_BUCKETS = (("0", "lag 0"), ("1", "lag 1"), ("2", "lag 2"), ("3plus", "lag ≥ 3"))
LAG_KEY = "staleness/tokens_lag_{}"

SERIES = (
    ("acc_mean", "accuracy (train samples)"),
    ("reward_mean", "reward"),
    ("entropy", "entropy"),
    ("response_length_mean", "response length (tokens)"),
    ("overlong_frac", "truncated samples (share)"),
    ("kept_ratio", "kept-group ratio"),
    ("pg_clipfrac_high", "clipped above 1 + ε_high (share)"),
    ("rollout_corr/rollout_is_mean", "importance weight proximal / behaviour"),
    ("rollout_corr/k3_kl", "KL behaviour ‖ learner (k3)"),
)
"""Scalar panels: (metrics.jsonl key, title); a panel is drawn when any run has its key."""

HELD_OUT = "held-out accuracy"
LAG_PANEL = "version lag of trained tokens"
LAG_FALLBACK = ("version_lag", "policy-version lag")


@dataclass
class RunData:
    """What the plots read from one run folder."""

    run_dir: Path
    name: str
    run_id: str
    rows: list[dict]
    summary: dict = field(default_factory=dict)
    evals: list[tuple[int, float]] = field(default_factory=list)
    """Held-out accuracy (the summary's ``eval_k``: acc/mean@k) by training step."""
    eval_key: str = ""

    @property
    def label(self) -> str:
        """``cpu-small (20260101-120000-ab12)``: the spec's name, then the rest of the id."""
        rest = self.run_id.removeprefix(f"{self.name}-")
        return self.run_id if rest == self.run_id else f"{self.name} ({rest})"

    def has(self, key: str) -> bool:
        return any(isinstance(r.get(key), int | float) for r in self.rows)

    def origin(self) -> float:
        """Epoch seconds at which training started: the zero of the wall-time axis."""
        if "train_start" in self.summary:
            return float(self.summary["train_start"])
        first = self.rows[0] if self.rows else {}
        return float(first.get("time", 0.0)) - float(first.get("train_s", 0.0))


def _read_jsonl(path: Path) -> list[dict]:
    """Every line of ``path``; a torn last line (a writer killed mid-write, no newline yet)
    is left out, a bad line anywhere else is an error."""
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        try:
            json.loads(lines[-1])
        except ValueError:
            lines.pop()
    return [json.loads(line) for line in lines if line.strip()]


def read_metrics(run_dir: Path) -> list[dict]:
    return _read_jsonl(Path(run_dir) / "metrics.jsonl")


def _held_out(summary: dict, evals: list[dict], rows: list[dict]) -> tuple[str, list]:
    k = summary.get("eval_k")
    if k is None:  # an evals.jsonl without a summary: the first acc/mean@k it has
        keys = [key for e in evals for key in e if key.startswith("acc/mean@")]
        k = keys[0].removeprefix("acc/mean@") if keys else None
    key = f"acc/mean@{k}" if k is not None else ""
    points = [(int(e["step"]), float(e[key])) for e in evals if key in e]
    if not points and "acc_before" in summary and "acc_after" in summary:
        last = summary.get("steps") or (rows[-1]["step"] if rows else 0)
        points = [(0, float(summary["acc_before"])), (int(last), float(summary["acc_after"]))]
    return key, sorted(points)


def load_run(run_dir: Path) -> RunData:
    """A run folder as ``dapo up`` writes it; only metrics.jsonl is required."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise FileNotFoundError(f"{run_dir}/metrics.jsonl has no training steps to plot")
    config_file, summary_file = run_dir / "config.yaml", run_dir / "summary.json"
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    run_id = summary.get("run_id") or run_dir.resolve().name
    key, evals = _held_out(summary, _read_jsonl(run_dir / EVALS_FILE), rows)
    name = (config or {}).get("name") or run_id
    return RunData(run_dir, name, run_id, rows, summary, evals, key)


def ema(values: Sequence[float], weight: float) -> list[float]:
    """Exponential moving average, debiased so the first points are not pulled to 0."""
    out, last = [], 0.0
    for i, y in enumerate(values, start=1):
        last = last * weight + (1 - weight) * y
        out.append(last / (1 - weight**i) if weight < 1 else y)
    return out


@dataclass(frozen=True)
class Axis:
    """The x axis: training steps, or seconds/minutes since training started."""

    kind: str = "step"
    scale: float = 1.0

    @classmethod
    def of(cls, kind: str, runs: Sequence[RunData]) -> Axis:
        if kind == "step":
            return cls()
        if kind != "time":
            raise ValueError(f"x axis must be 'step' or 'time', got {kind!r}")
        span = max(float(r.rows[-1].get("time", 0.0)) - r.origin() for r in runs)
        return cls("time", 60.0 if span > 600 else 1.0)

    @property
    def label(self) -> str:
        if self.kind == "step":
            return "training step"
        return "wall time since training started (" + ("min" if self.scale > 1 else "s") + ")"

    def xs(self, run: RunData, rows: Sequence[dict]) -> list[float]:
        if self.kind == "step":
            return [float(r["step"]) for r in rows]
        t0 = run.origin()
        return [(float(r.get("time", t0)) - t0) / self.scale for r in rows]

    def at_step(self, run: RunData, step: int) -> float:
        """Where training step ``step`` lies on this axis (step 0: the start)."""
        if self.kind == "step" or step <= 0:
            return float(step)
        done = [r for r in run.rows if r["step"] <= step] or run.rows[:1]
        return self.xs(run, done[-1:])[0]


@dataclass
class Style:
    axis: Axis
    smooth: float
    single: bool


def _series(ax, run: RunData, key: str, colour, style: Style) -> None:
    rows = [r for r in run.rows if isinstance(r.get(key), int | float)]
    if not rows:
        return
    xs, ys = style.axis.xs(run, rows), [float(r[key]) for r in rows]
    ax.plot(xs, ys, color=colour, alpha=0.22, linewidth=0.8)
    ax.plot(xs, ema(ys, style.smooth), color=colour, linewidth=1.7)


def _held_out_panel(ax, run: RunData, colour, style: Style) -> None:
    if not run.evals:
        return
    xs = [style.axis.at_step(run, s) for s, _ in run.evals]
    ys = [acc for _, acc in run.evals]
    ax.plot(xs, ys, color=colour, marker="o", markersize=5, linewidth=1.4)
    if style.single:
        for x, y in zip(xs, ys, strict=True):
            ax.annotate(f"{y:.1%}", (x, y), textcoords="offset points", xytext=(0, 7),
                        ha="center", fontsize=8)  # fmt: skip
    if run.eval_key:
        ax.set_ylabel(run.eval_key)


def _lag_shares(run: RunData) -> tuple[list[dict], list[list[float]]]:
    keys = [LAG_KEY.format(b) for b, _ in LAG_BUCKETS]
    rows = [r for r in run.rows if all(isinstance(r.get(k), int | float) for k in keys)]
    shares = []
    for r in rows:
        total = sum(float(r[k]) for k in keys) or 1.0
        shares.append([float(r[k]) / total for k in keys])
    return rows, [list(col) for col in zip(*shares, strict=True)] if shares else []


def _lag_panel(ax, run: RunData, colour, style: Style) -> None:
    """One run: the share of each lag, stacked. Several: the share of tokens with lag ≥ 1
    of each run (with max_staleness 1, the whole distribution)."""
    rows, cols = _lag_shares(run)
    if not rows:
        _series(ax, run, LAG_FALLBACK[0], colour, style)
        return
    xs = style.axis.xs(run, rows)
    if style.single:
        smoothed = [ema(c, style.smooth) for c in cols]
        colours = ["#4c72b0", "#dd8452", "#c44e52", "#8172b3"]
        ax.stackplot(xs, smoothed, labels=[lab for _, lab in LAG_BUCKETS], colors=colours,
                     alpha=0.85)  # fmt: skip
        ax.set_ylim(0, 1)
        ax.legend(loc="lower left", fontsize=7, ncol=4, framealpha=0.8)
        return
    stale = [1.0 - s for s in cols[0]]
    ax.plot(xs, stale, color=colour, alpha=0.1, linewidth=0.6)
    ax.plot(xs, ema(stale, style.smooth), color=colour, linewidth=1.7)
    ax.set_ylabel("share with lag ≥ 1")


@dataclass(frozen=True)
class Plot:
    path: Path
    titles: list[str]
    """The titles of the panels drawn, in reading order."""


def panels_for(runs: Sequence[RunData]) -> list[tuple[str, str]]:
    """(kind, title) of every panel some run has data for, in reading order."""
    out = []
    if any(r.evals for r in runs):
        out.append(("held_out", HELD_OUT))
    out += [(key, title) for key, title in SERIES if any(r.has(key) for r in runs)]
    if any(r.has(LAG_KEY.format("0")) or r.has(LAG_FALLBACK[0]) for r in runs):
        out.append(("lag", LAG_PANEL))
    return out


def _draw(ax, kind: str, run: RunData, colour, style: Style) -> None:
    if kind == "held_out":
        _held_out_panel(ax, run, colour, style)
    elif kind == "lag":
        _lag_panel(ax, run, colour, style)
    else:
        _series(ax, run, kind, colour, style)


def _title(runs: Sequence[RunData]) -> str:
    if len(runs) > 1:
        return f"{len(runs)} runs compared"
    run = runs[0]
    accs = [acc for _, acc in run.evals]
    if len(accs) >= 2:
        return f"{run.label}: held-out {run.eval_key or 'accuracy'} {accs[0]:.1%} → {accs[-1]:.1%}"
    return run.label


def plot_runs(
    run_dirs: Sequence[Path], out: Path, *, x: str = "step", smooth: float = SMOOTHING
) -> Plot:
    """Every run on the same panels, one colour per run, into the PNG ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    if not 0.0 <= smooth < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smooth}")
    runs = [load_run(Path(d)) for d in run_dirs]
    if not runs:
        raise ValueError("no run to plot")
    style = Style(Axis.of(x, runs), smooth, single=len(runs) == 1)
    panels = panels_for(runs)
    cols = 4 if len(panels) > 9 else 3
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(
        nrows, cols, figsize=(4.6 * cols, 3.2 * nrows + 0.8), squeeze=False, layout="constrained"
    )
    colours = plt.get_cmap("tab10").colors
    for ax, (kind, title) in zip(axes.flat, panels, strict=False):
        for i, run in enumerate(runs):
            _draw(ax, kind, run, colours[i % len(colours)], style)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(style.axis.label, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=colours[i % len(colours)], linewidth=2.5, label=r.label)
               for i, r in enumerate(runs)]  # fmt: skip
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(runs), 3), fontsize=9,
               frameon=False)  # fmt: skip
    fig.suptitle(_title(runs), fontsize=12)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Plot(out, [title for _, title in panels])


def plot_run(
    run_dir: Path, out: Path | None = None, *, x: str = "step", smooth: float = SMOOTHING
) -> Path:
    """One run's curves, by default into its ``curves.png``."""
    out = Path(out) if out else Path(run_dir) / "curves.png"
    return plot_runs([run_dir], out, x=x, smooth=smooth).path
