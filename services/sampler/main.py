"""Sampler service entry point."""

from __future__ import annotations

from dapo.data.dataset import load_default_or_files
from dapo.data.models import load_tokenizer
from dapo.data.prompts import PromptSource
from dapo.runtime.config import ServiceSettings
from dapo.runtime.service import ServiceRuntime
from services.sampler.service import SamplerMetrics, serve


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
        rt.serve(lambda: serve(rt.ctx, source, metrics))


def main() -> int:
    run(SamplerSettings.from_env())
    return 0
