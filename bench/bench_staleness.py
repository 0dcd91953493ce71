"""Asynchronous against on-policy training on the default task, at equal trained samples.

Four runs of ``cpu-small``, same seed and the same number of steps (so the same number of
trained samples), differing only in ``algorithm.max_staleness`` and the objective:

- ``s0``: 0, strictly on-policy (generation for a batch waits for its weights);
- ``s1``: 1 with the decoupled token-level correction (the default);
- ``s2``: 2 with the same correction;
- ``s2_uncorrected``: 2, trained as if on-policy (``rollout_is: null``,
  ``allow_uncorrected_staleness``): what the correction buys.

Each run's checkpoints (every ``DAPO_BENCH_STALENESS_EVERY`` steps) are evaluated afterwards
on the same held-out problems (``bench.runs``). Figures, per setting ``<s>``:
``staleness.<s>.acc`` (the last checkpoint's held-out accuracy), ``staleness.<s>.train_s``
(training wall time) and ``staleness.<s>.samples_per_s``. Then:

- ``staleness.acc_gap_s1`` / ``_s2``: on-policy accuracy minus the corrected asynchronous
  one (goal: at most 0.02);
- ``sync.ratio_async_vs_onpolicy``: wall-time speed-up at equal accuracy: the training
  seconds the on-policy run needs to first reach its own final accuracy less 0.02, over the
  seconds ``s1`` needs for the same (goal >= 1.5; -1 when ``s1`` never gets there).

One run per setting (each is minutes long); ``.bench/staleness.png`` draws accuracy
against training wall time, one curve per setting.
"""

from __future__ import annotations

import os
from pathlib import Path

from bench.runs import accuracy_curve, samples_per_s, seconds_to, train
from dapo.runtime.config import load_run_spec

STEPS = int(os.environ.get("DAPO_BENCH_STALENESS_STEPS", "250"))
EVERY = int(os.environ.get("DAPO_BENCH_STALENESS_EVERY", "50"))
TOLERANCE = 0.02
SETTINGS: dict[str, list[str]] = {
    "s0": ["algorithm.max_staleness=0", "algorithm.rollout_correction.rollout_is=null"],
    "s1": ["algorithm.max_staleness=1"],
    "s2": ["algorithm.max_staleness=2"],
    "s2_uncorrected": [
        "algorithm.max_staleness=2",
        "algorithm.rollout_correction.rollout_is=null",
        "algorithm.rollout_correction.allow_uncorrected_staleness=true",
    ],
}


def plot(curves: dict[str, list[tuple[int, float, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in curves.items():
        ax.plot([t for _, t, _ in curve], [a for _, _, a in curve], marker="o", label=name)
    ax.set_xlabel("training wall time (s)")
    ax.set_ylabel("held-out accuracy (acc/mean@2)")
    ax.set_title(f"default task, {STEPS} steps each: max_staleness and correction")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run() -> dict[str, float]:
    spec = load_run_spec("cpu-small")
    per_step = spec.data.train_batch_size * spec.rollout.n
    result: dict[str, float] = {}
    curves = {}
    for name, overrides in SETTINGS.items():
        run_dir, summary = train(
            Path(".bench/staleness") / name,
            [f"trainer.total_training_steps={STEPS}", f"trainer.save_freq={EVERY}", *overrides],
        )
        curves[name] = accuracy_curve(run_dir)
        result[f"staleness.{name}.acc"] = curves[name][-1][2]
        result[f"staleness.{name}.train_s"] = summary["train_wall_s"]
        result[f"staleness.{name}.samples_per_s"] = samples_per_s(summary, per_step)
    for name in ("s1", "s2"):
        result[f"staleness.acc_gap_{name}"] = (
            result["staleness.s0.acc"] - result[f"staleness.{name}.acc"]
        )
    target = result["staleness.s0.acc"] - TOLERANCE
    t_sync, t_async = seconds_to(curves["s0"], target), seconds_to(curves["s1"], target)
    result["sync.ratio_async_vs_onpolicy"] = t_sync / t_async if t_async > 0 else -1.0
    plot(curves, Path(".bench/staleness.png"))
    return result
