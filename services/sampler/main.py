"""Sampler service entry point."""

from __future__ import annotations

from dapo.data.dataset import DatasetError, load_default_or_files
from dapo.data.models import load_tokenizer
from dapo.data.prompts import PromptSource
from dapo.runtime.config import ServiceSettings
from dapo.runtime.service import ServiceRuntime
from services.sampler.service import serve


class SamplerSettings(ServiceSettings):
    """The sampler runs as exactly one replica per run (its consumer name is fixed)."""


def run(settings: SamplerSettings) -> None:
    with ServiceRuntime("sampler", settings) as rt:
        rows = load_default_or_files(
            rt.spec.data.train_files, settings.cache_dir or None, prompt_key=rt.spec.data.prompt_key
        )
        source = PromptSource(rows, load_tokenizer(rt.spec.model, settings.cache_dir), rt.spec.data)
        try:
            source.check_all()
        except DatasetError as exc:  # the run cannot go on: say why where the user looks
            rt.store.set_status(rt.run_id, "failed", error=str(exc))
            raise
        serve(rt, source)


def main() -> int:
    run(SamplerSettings.from_env())
    return 0
