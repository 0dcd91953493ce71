"""`dapo eval` on the real AIME 2024 parquet file with a small local model."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dapo.cli.evaluate import EvalSpec, evaluate_model_dir
from dapo.data.dataset import load_dataset
from dapo.data.task.model import ModelShape, build_model
from dapo.data.task.tokenizer import save_byte_tokenizer
from proto.messages import SamplingParams
from tests.e2e_helpers import make_dataset, make_model_dir

AIME = Path(__file__).resolve().parents[4] / "shared" / "data" / "aime-2024.parquet"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model"))


def test_dapo_eval_prints_the_usual_figures_on_aime(model_dir):
    if not AIME.is_file():
        pytest.skip(f"{AIME} not present (the shared AIME 2024 evaluation set)")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dapo.cli",
            "eval",
            "--model",
            str(model_dir),
            "--data",
            str(AIME),
            "--n",
            "2",
            "--limit",
            "3",
            "--max-new-tokens",
            "8",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(proc.stdout)
    assert {"acc/mean@2", "acc/best@2", "acc/maj@2", "response_length/mean"} <= figures.keys()
    assert figures["problems"] == 3
    assert 0.0 <= figures["acc/mean@2"] <= figures["acc/best@2"] <= 1.0


def overfit(model_dir: Path, prompt: str, response: str, steps: int = 150) -> None:
    """Teach the tiny model one answer, so evaluation has something right to count."""
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    ids = tok.encode(prompt + response) + [tok.eos_token_id]
    p = len(tok.encode(prompt))
    x = torch.tensor([ids])
    labels = x.clone()
    labels[0, :p] = -100
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(input_ids=x, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(model_dir)


def test_eval_counts_correct_answers(tmp_path):
    model_dir = tmp_path / "model"
    shape = ModelShape(
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=64,
        max_positions=64,
    )
    build_model(shape, seed=0).save_pretrained(model_dir)
    save_byte_tokenizer(model_dir)
    overfit(model_dir, "0+1=", "Answer: 7")
    rows = load_dataset([make_dataset(tmp_path / "d.jsonl", n=1)])  # "0+1=", ground truth "1"
    right = replace(rows[0], ground_truth="7")
    spec = EvalSpec(SamplingParams(n=4, temperature=1.0, top_p=1.0, max_new_tokens=12, seed=0))
    figures = evaluate_model_dir(model_dir, [right, rows[0]], spec, progress=False)
    # one problem always right, one always wrong (hand-derived: 4/8 samples, 1/2 problems)
    assert figures["acc/mean@4"] == 0.5
    assert figures["acc/best@4"] == 0.5 and figures["acc/maj@4"] == 0.5
    assert figures["response_length/mean"] == len("Answer: 7") + 1  # EOS counted
