"""Prometheus series of the learner (units as name suffixes).

A step figure ``k`` (a key of ``Trainer.train_batch``'s figures, as in ``metrics.jsonl``)
becomes the gauge ``dapo_learner_<k>`` with ``/`` read as ``_``: ``rollout_corr/k3_kl`` is
``dapo_learner_rollout_corr_k3_kl``. The token-lag histogram of each step and the samples the
learner drops as stale are counters, so ``rate()`` gives their distribution over time.
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

from dapo.algorithm.off_policy import LAG_BUCKETS

_STEP_GAUGES = {
    "loss": "Policy loss of the last batch (mean over its mini-batches)",
    "entropy": "Mean per-token entropy of the policy on the last batch",
    "pg_clipfrac_high": "Fraction of tokens clipped at 1 + clip_ratio_high",
    "pg_clipfrac_low": "Fraction of tokens clipped at 1 - clip_ratio_low",
    "pg_clipfrac_dual": "Fraction of tokens hitting the dual clip",
    "ppo_kl": "Approximate KL(old || new) over the batch",
    "grad_norm": "Gradient norm before clipping",
    "lr": "Learning rate",
    "reward_mean": "Mean sample reward in the batch",
    "acc_mean": "Mean sample accuracy in the batch",
    "kept_ratio": "Kept groups / groups seen while filling the batch",
    "overlong_frac": "Fraction of truncated samples in the batch",
    "version_lag": "Mean policy-version lag of the batch's groups",
    "pg_loss": "Policy-gradient term of the loss (mean over the batch's mini-batches)",
    "rollout_corr/rollout_is_mean": "Mean importance ratio proximal / behaviour (untruncated)",
    "rollout_corr/rollout_is_max": "Largest importance ratio proximal / behaviour",
    "rollout_corr/rollout_is_ratio_fraction_high": "Fraction of importance weights truncated",
    "rollout_corr/rollout_rs_masked_fraction": "Fraction of tokens rejected (masked)",
    "rollout_corr/rollout_is_veto_fraction": "Fraction of sequences vetoed",
    "rollout_corr/kl": "KL(behaviour || proximal), k1 estimate over the batch's tokens",
    "rollout_corr/k3_kl": "KL(behaviour || proximal), k3 estimate over the batch's tokens",
    "rollout_corr/log_prob_abs_diff_max": "Largest |recomputed - rollout| token log-prob",
    "staleness/lag_mean": "Mean lag (learner version - token version) of the batch's tokens",
    "staleness/lag_max": "Largest lag of the batch's tokens",
}
"""Step figures published as gauges, with their help text."""


class LearnerMetrics:
    def __init__(self, registry) -> None:
        self.step = Gauge("dapo_learner_step", "Training batches consumed", registry=registry)
        self.version = Gauge("dapo_learner_policy_version", "Policy version", registry=registry)
        self.last_step = Gauge(
            "dapo_learner_last_step_timestamp_seconds",
            "Unix time of the last training step",
            registry=registry,
        )
        self.skipped = Counter(
            "dapo_learner_skipped_steps", "Optimizer steps skipped (non-finite)", registry=registry
        )
        self.gauges = {
            k: Gauge(f"dapo_learner_{k.replace('/', '_')}", h, registry=registry)
            for k, h in _STEP_GAUGES.items()
        }
        self.token_lag = Counter(
            "dapo_learner_token_lag_tokens",
            "Response tokens reaching the learner, by lag (learner version - generating version)",
            ["lag"],
            registry=registry,
        )
        self.stale_dropped = Counter(
            "dapo_learner_stale_samples_dropped",
            "Samples masked out by the learner: a token older than max_staleness",
            registry=registry,
        )
        self.resp_len = Histogram(
            "dapo_learner_response_length_tokens",
            "Mean response length per batch",
            buckets=(8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768),
            registry=registry,
        )
        self.step_seconds = Histogram(
            "dapo_learner_step_seconds", "Wall time of one batch", registry=registry
        )
        self.sync = Histogram(
            "dapo_weight_sync_seconds",
            "Weight broadcast time by phase",
            ["phase"],
            registry=registry,
        )
        self.sync_failures = Counter(
            "dapo_weight_sync_failures", "Broadcasts abandoned", registry=registry
        )
        self.mismatched = Gauge(
            "dapo_weight_mismatched_workers",
            "Live rollout workers not holding the previous broadcast exactly",
            registry=registry,
        )
        self.sync_bytes = Counter("dapo_weight_sync_bytes", "Bytes broadcast", registry=registry)

    def observe_step(self, f: dict) -> None:
        self.step.set(f["step"])
        self.version.set(f["version"])
        self.last_step.set(time.time())
        if f.get("skipped_steps"):
            self.skipped.inc(f["skipped_steps"])
        for k, g in self.gauges.items():
            if f.get(k) is not None:
                g.set(f[k])
        for bucket in LAG_BUCKETS:
            label = "3+" if bucket == "3plus" else bucket
            self.token_lag.labels(label).inc(f.get(f"staleness/tokens_lag_{bucket}", 0.0))
        self.stale_dropped.inc(f.get("staleness/dropped_samples", 0.0))
        self.resp_len.observe(f["response_length_mean"])
        self.step_seconds.observe(f["train_s"])

    def observe_sync(self, stats) -> None:
        for phase in ("pack_s", "rendezvous_s", "broadcast_s", "total_s"):
            value = getattr(stats, phase, None)
            if value is not None:
                self.sync.labels(phase.removesuffix("_s")).observe(value)
        self.sync_bytes.inc(getattr(stats, "bytes", 0))
