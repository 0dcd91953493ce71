"""The whole pipeline on the default task: throughput and time to 80% held-out accuracy.

- ``e2e.samples_per_s``: samples trained per second of training wall time (G x groups per
  batch x steps / time from run start to the last step), with the default asynchrony
  (``algorithm.max_staleness`` 1 and its correction);
- ``e2e.seconds_to_80pct``: training seconds until the held-out accuracy (256 problems x 2
  samples at temperature 1, top_p 1) of a saved checkpoint first reaches 80%; checkpoints
  are evaluated after the run, so evaluation does not slow training. -1 when the step
  budget ends first.

Asynchronous against on-policy training is ``bench_staleness``.
"""

from __future__ import annotations

import os
from pathlib import Path

from bench.runs import accuracy_curve, samples_per_s, seconds_to, train
from dapo.runtime.config import load_run_spec

STEPS_TO_80 = int(os.environ.get("DAPO_BENCH_E2E_STEPS", "700"))


def run() -> dict[str, float]:
    spec = load_run_spec("cpu-small")
    per_step = spec.data.train_batch_size * spec.rollout.n
    run_dir, summary = train(
        Path(".bench/e2e/async"),
        [f"trainer.total_training_steps={STEPS_TO_80}", "trainer.save_freq=50"],
    )
    return {
        "e2e.samples_per_s": samples_per_s(summary, per_step),
        "e2e.seconds_to_80pct": seconds_to(accuracy_curve(run_dir), 0.80),
    }
