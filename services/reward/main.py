"""Reward service entry point: settings, tokenizer, optional verifier pool, loop."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor

from pydantic import Field

from dapo.data.models import load_tokenizer
from dapo.runtime.config import ServiceSettings
from dapo.runtime.service import ServiceRuntime
from services.reward.service import RewardWorker


class RewardSettings(ServiceSettings):
    workers: int = Field(0, ge=0)
    """Verifier processes (DAPO_WORKERS) scoring the groups of a read in parallel; 0 = score
    in the service process."""
    batch: int = Field(32, ge=1)
    """Rollout groups read per poll."""


def run(settings: RewardSettings) -> None:
    with ServiceRuntime("reward", settings) as rt:
        tokenizer = load_tokenizer(rt.ctx.spec.model, settings.cache_dir)
        pool = ProcessPoolExecutor(settings.workers) if settings.workers > 0 else None
        try:
            rt.serve(RewardWorker(rt.ctx, tokenizer, settings.batch, pool).serve)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)


def main() -> int:
    run(RewardSettings.from_env())
    return 0
