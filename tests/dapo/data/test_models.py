"""Where a run's model and tokenizer come from: local directories only."""

from __future__ import annotations

import pytest

from dapo.data.models import load_tokenizer, resolve_model_dir
from proto.runspec import ModelConfig


def test_a_hub_id_is_never_downloaded(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        resolve_model_dir(ModelConfig(path="Qwen/Qwen2.5-32B"), tmp_path)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    cfg = ModelConfig(path=str(model), tokenizer_path="Qwen/Qwen2.5-32B")
    with pytest.raises(FileNotFoundError, match="tokenizer_path .* not a local directory"):
        load_tokenizer(cfg, tmp_path)
