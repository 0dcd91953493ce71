"""The plan's Redis figure against a real run: the service processes of a short run on a
private Redis, the streams' memory read with MEMORY USAGE while it trains, compared with
``make_plan`` for the same spec and the lengths the run actually produced."""

from __future__ import annotations

from dapo.sizing import ClusterShape, Workload, load_model_shape, make_plan
from dapo.sizing.shapes import GIB
from tests.dapo.sizing.redis_run import measure_run

TOLERANCE = 2.0
"""The plan may be off by this factor either way: a property of the formula, not timing."""


def test_plan_predicts_the_streams_memory_of_a_real_run(tmp_path, redis_url):
    run = measure_run(tmp_path, redis_url)
    plan = make_plan(
        run.spec,
        load_model_shape(run.model_dir),
        ClusterShape(learner_gpus=1, rollout_gpus=1, reward_replicas=1),
        Workload(
            prompt_tokens=round(run.prompt_tokens),
            response_tokens=max(round(run.response_tokens), 1),
            keep_rate=min(max(run.keep_rate, 0.01), 1.0),
        ),
    )
    red = plan["redis"]
    # fewer batches than a trim needs: every batch of the run is still there, as planned
    assert run.batches_left == run.spec.trainer.total_training_steps == red["entries.batches"]
    predicted, measured = red["data"] * GIB, run.peaks["total"]
    assert measured / TOLERANCE <= predicted <= measured * TOLERANCE, (predicted, run.peaks)
    for name in ("rollouts", "scored", "batches"):
        planned = red[f"stream.{name}"] * GIB
        assert run.peaks[name] / TOLERANCE <= planned <= run.peaks[name] * TOLERANCE, name
