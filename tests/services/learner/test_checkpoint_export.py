"""The streamed Hugging Face export (``services.learner.hf_export``): safetensors files
written header first and then one tensor at a time, cut into HF's sharded layout, that
plain ``from_pretrained`` and the safetensors library load back exactly. The sharded
(DTensor) path is checked by test_distributed.py."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from services.learner.hf_export import INDEX, export_hf, weight_entries
from tests.services.learner.test_trainer import tiny_model


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_single_file_export_loads_back_exactly(tmp_path, dtype):
    model = tiny_model(dtype)
    export_hf(model, tmp_path, is_writer=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=dtype)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == str(dtype)[6:]
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still tied
    want, got = _params(model), _params(loaded)
    assert list(got) == list(want)
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    # the tied head is written once, under the embedding's name, as save_pretrained does
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")


def test_sharded_files_and_index_like_save_pretrained(tmp_path):
    model = tiny_model()
    export_hf(model, tmp_path, is_writer=True, max_file_bytes=8_000)
    index = json.loads((tmp_path / INDEX).read_text())
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) > 2 and set(index["weight_map"].values()) == set(files)
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    total = sum(t.numel() * t.element_size() for _, t in weight_entries(model))
    assert index["metadata"]["total_size"] == total
    for name in files:  # each file stays near the cut (one tensor may exceed it alone)
        assert len(load_file(tmp_path / name)) >= 1
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    for name, value in _params(model).items():
        assert torch.equal(_params(loaded)[name], value), name


def test_only_the_writer_writes(tmp_path):
    export_hf(tiny_model(), tmp_path, is_writer=False)
    assert list(tmp_path.iterdir()) == []
