"""Sampler service entry point."""

from __future__ import annotations

import logging
import time

from dapo.data.dataset import load_default_or_files
from dapo.data.models import load_tokenizer
from dapo.data.prompts import PromptSource
from dapo.runtime.config import ServiceSettings
from dapo.runtime.service import ServiceContext, ServiceRuntime
from services.sampler.service import Sampler, SamplerMetrics

log = logging.getLogger(__name__)


class SamplerSettings(ServiceSettings):
    """The sampler runs as exactly one replica per run (its consumer name is fixed)."""


def prompt_source(spec, cache_dir: str) -> PromptSource:
    """The run's prompts, every row validated, rendered and tokenised before the first
    dispatch (a bad row stops the run here, naming it)."""
    rows = load_default_or_files(
        spec.data.train_files, cache_dir or None, prompt_key=spec.data.prompt_key
    )
    source = PromptSource(rows, load_tokenizer(spec.model, cache_dir), spec.data)
    source.check_all()
    return source


def run(settings: SamplerSettings) -> None:
    with ServiceRuntime("sampler", settings) as rt:
        source = prompt_source(rt.ctx.spec, settings.cache_dir)  # a DatasetError fails the run
        metrics = SamplerMetrics(rt.ctx.registry)  # once per process, however often entered
        rt.serve(lambda: serve_anew(rt.ctx, source, metrics))


def serve_anew(ctx: ServiceContext, source: PromptSource, metrics: SamplerMetrics) -> None:
    """The sampler's loop with a new ``Sampler``: entered again after a Redis outage, it
    re-reads the groups it held from its fresh bus, as a restarted sampler does."""
    sampler = Sampler(ctx, ctx.spec, source, metrics)
    last_log = 0.0
    while not ctx.stopping():
        sampler.tick()
        if time.monotonic() - last_log > 10:
            last_log = time.monotonic()
            log.info("account %s", sampler.account())


def main() -> int:
    run(SamplerSettings.from_env())
    return 0
