"""Where a run's model and tokenizer live on disk, and loading them."""

from __future__ import annotations

from pathlib import Path

from proto.runspec import ModelConfig

DEFAULT_TASK = "default-task"


def resolve_model_dir(
    cfg: ModelConfig, cache_dir: str | Path | None, progress: bool = False
) -> Path:
    """The model directory; ``default-task`` is the embedded tiny model (built if missing)."""
    if cfg.path == DEFAULT_TASK:
        from dapo.data.task import prepare_default_task

        root = Path(cache_dir) if cache_dir else None
        return Path(prepare_default_task(root, progress=progress).model_dir)
    path = Path(cfg.path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model.path {cfg.path!r} is not a Hugging Face model directory (no config.json); "
            "models are never downloaded at run time"
        )
    return path


def tokenizer_dir(cfg: ModelConfig, cache_dir: str | Path | None) -> Path:
    """The tokenizer's directory: ``model.tokenizer_path``, else the model's. A name that is
    not a local directory is refused (a Hub id would make transformers download it)."""
    if cfg.tokenizer_path is None:
        return resolve_model_dir(cfg, cache_dir)
    path = Path(cfg.tokenizer_path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"model.tokenizer_path {cfg.tokenizer_path!r} is not a local directory; "
            "tokenizers are never downloaded at run time"
        )
    return path


def load_tokenizer(cfg: ModelConfig, cache_dir: str | Path | None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir(cfg, cache_dir)), local_files_only=True)


def pick_device(setting: str) -> str:
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA GPU is visible")
    return setting
