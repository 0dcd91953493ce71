"""The embedded default task: tokenizer round trip, model files, data schema, cache."""

from __future__ import annotations

import json
import os
import random
import unicodedata
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2ForCausalLM

from dapo.data.dataset import load_dataset
from dapo.data.task import DefaultTask, TaskSpec, load_default_task, prepare_default_task
from dapo.data.task.model import ModelShape, build_model, count_parameters
from dapo.data.task.problems import Problem, all_problems, response_text, split_problems, to_row
from dapo.data.task.sft import IGNORE, SftSettings, collate, extract_answer, train_sft
from dapo.data.task.tokenizer import EOS_ID, EOS_TOKEN, build_byte_tokenizer, save_byte_tokenizer

torch.set_num_threads(1)

FAST_STEPS = 3


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> DefaultTask:
    return prepare_default_task(
        tmp_path_factory.mktemp("task"), progress=False, sft_steps=FAST_STEPS
    )


@pytest.fixture(scope="module")
def auto_tok(built):
    return AutoTokenizer.from_pretrained(str(built.model_dir))


# ---- tokenizer ---------------------------------------------------------------


def test_tokenizer_is_one_token_per_byte(auto_tok):
    assert type(auto_tok).__name__ == "Qwen2Tokenizer"  # rebuilt from vocab + empty merges
    assert auto_tok.eos_token == EOS_TOKEN and auto_tok.pad_token == EOS_TOKEN
    assert auto_tok.eos_token_id == EOS_ID == auto_tok.pad_token_id
    assert len(auto_tok) == 257
    assert auto_tok.chat_template is None
    text = "17+25=Answer: 42\n"
    assert auto_tok.encode(text, add_special_tokens=False) == list(text.encode())
    assert auto_tok.encode(EOS_TOKEN, add_special_tokens=False) == [EOS_ID]


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=60))
def test_round_trip_of_arbitrary_text(auto_tok, text):
    expected = unicodedata.normalize("NFC", text)  # the Qwen2 normalizer composes
    ids = auto_tok.encode(text, add_special_tokens=False)
    assert auto_tok.decode(ids) == expected
    if EOS_TOKEN not in expected:
        assert len(ids) == len(expected.encode("utf-8"))
        assert ids == build_byte_tokenizer().encode(text).ids


@pytest.mark.parametrize(
    "text", ["0123456789", "héllo wörld 12345 日本語 🙂", "a\tb  c\r\nd", "e\u0301 composes"]
)
def test_round_trip_examples_from_tokenizer_only_dir(tmp_path, auto_tok, text):
    save_byte_tokenizer(tmp_path)  # no config.json: loads as a generic fast tokenizer
    plain = AutoTokenizer.from_pretrained(str(tmp_path))
    ids = plain.encode(text, add_special_tokens=False)
    assert ids == auto_tok.encode(text, add_special_tokens=False)
    assert plain.decode(ids) == unicodedata.normalize("NFC", text)


# ---- model -------------------------------------------------------------------


def test_model_loads_with_plain_auto_class(built, auto_tok):
    model = AutoModelForCausalLM.from_pretrained(str(built.model_dir))
    assert isinstance(model, Qwen2ForCausalLM)
    assert model.config.vocab_size == 257 and model.config.eos_token_id == EOS_ID
    assert 0.5e6 < count_parameters(model) < 1.5e6
    assert built.num_parameters == count_parameters(model)
    ids = auto_tok("17+25=", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape == (1, 6, 257)


def test_same_seed_same_weights_other_seed_differs():
    a, b, c = (build_model(ModelShape(), s) for s in (7, 7, 8))
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert any(
        not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=True)
    )


# ---- data --------------------------------------------------------------------


def test_problem_space_and_split_are_disjoint_and_seeded():
    assert len(all_problems(99, ("+",))) == 100 * 100
    assert len(all_problems(9, ("-",))) == 55  # pairs with b <= a
    problems = all_problems(20, ("+", "-"))
    train, val = split_problems(problems, 50, None, seed=3)
    assert len(val) == 50 and len(train) == len(problems) - 50
    assert not {p.text for p in train} & {p.text for p in val}
    assert split_problems(problems, 50, None, seed=3) == (train, val)
    assert split_problems(problems, 50, None, seed=4)[1] != val


def test_row_schema_and_answer_format():
    row = to_row(Problem(17, "+", 25), 4, "train")
    assert row == {
        "data_source": row["data_source"],
        "prompt": [{"role": "user", "content": "17+25="}],
        "ability": row["ability"],
        "reward_model": {"style": "rule", "ground_truth": "42"},
        "extra_info": {"index": 4, "split": "train"},
    }
    assert Problem(30, "-", 7).answer == 23
    assert response_text(42) == "Answer: 42"
    assert extract_answer(response_text(42)) == "42"


def test_files_validate_through_the_dataset_loader(built):
    train = load_dataset(built.train_file)
    val = load_dataset(built.val_file)
    assert (len(train), len(val)) == (built.num_train, built.num_val) == (9488, 512)
    assert not {r.messages[0]["content"] for r in train} & {r.messages[0]["content"] for r in val}
    for row in random.Random(0).sample(train, 50) + val[:50]:
        a, b = row.messages[0]["content"].removesuffix("=").split("+")
        assert row.ground_truth == str(int(a) + int(b))
        assert len(row.messages[0]["content"]) <= 6  # short prompts: tokens are bytes
    assert {r.extra_info["split"] for r in val} == {"val"}
    assert [r.extra_info["index"] for r in train[:3]] == [0, 1, 2]


# ---- warm start ----------------------------------------------------------------


def test_collate_masks_prompt_and_padding():
    ids, mask, labels = collate([([1, 2, 3, 4], 2), ([5, 6, 7], 1)], pad_id=9)
    assert ids.tolist() == [[1, 2, 3, 4], [5, 6, 7, 9]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert labels.tolist() == [[IGNORE, IGNORE, 3, 4], [IGNORE, 6, 7, IGNORE]]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Answer: 42", "42"),
        ("work\nanswer:  7 \n", "7"),
        ("Answer: 1\nAnswer: 2", "2"),
        ("42", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_supervised_steps_lower_the_loss(auto_tok):
    model = build_model(ModelShape(), 0)
    train, val = split_problems(all_problems(99, ("+",)), 8, 256, seed=0)
    losses: list[float] = []
    cfg = SftSettings(max_steps=40, batch_size=16, target_accuracy=None)
    result = train_sft(
        model, auto_tok, train, val, cfg, on_step=lambda step, loss, acc: losses.append(loss)
    )
    assert result.steps == 40 and len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_early_stop_at_first_evaluation_reaching_target(auto_tok):
    model = build_model(ModelShape(), 0)
    train, val = split_problems(all_problems(9, ("+",)), 8, None, seed=0)
    cfg = SftSettings(
        max_steps=50, batch_size=4, eval_every=3, eval_problems=8, target_accuracy=0.0
    )
    result = train_sft(model, auto_tok, train, val, cfg)
    assert result.steps == 3 and len(result.history) == 1


# ---- cache -------------------------------------------------------------------


def _mtime(path: Path) -> int:
    return os.stat(path).st_mtime_ns


def test_second_call_reuses_the_cache(built):
    weights = built.model_dir / "model.safetensors"
    before = (_mtime(weights), _mtime(built.root / "task.json"))
    again = prepare_default_task(built.root, progress=False, sft_steps=FAST_STEPS)
    assert again == built
    assert (_mtime(weights), _mtime(built.root / "task.json")) == before
    info = json.loads((built.root / "task.json").read_text())
    assert info["fingerprint"] == built.fingerprint and info["sft_steps"] == FAST_STEPS
    assert 0.0 <= built.base_accuracy <= 1.0


def test_missing_marker_rebuilds_identically(tmp_path):
    first = prepare_default_task(tmp_path, progress=False, sft_steps=2)
    weights = (first.model_dir / "model.safetensors").read_bytes()
    (tmp_path / "task.json").unlink()  # as if the build had been interrupted
    assert load_default_task(tmp_path, _fast_spec(2)) is None
    stamp = _mtime(first.model_dir / "model.safetensors")
    second = prepare_default_task(tmp_path, progress=False, sft_steps=2)
    assert _mtime(second.model_dir / "model.safetensors") != stamp
    assert (second.model_dir / "model.safetensors").read_bytes() == weights  # deterministic
    assert second.base_accuracy == first.base_accuracy


def test_changed_settings_or_force_rebuild(tmp_path):
    first = prepare_default_task(tmp_path, progress=False, sft_steps=1)
    second = prepare_default_task(tmp_path, progress=False, sft_steps=2)
    assert second.fingerprint != first.fingerprint and second.sft_steps == 2
    stamp = _mtime(tmp_path / "task.json")
    forced = prepare_default_task(tmp_path, progress=False, sft_steps=2, force=True)
    assert forced.fingerprint == second.fingerprint
    assert _mtime(tmp_path / "task.json") != stamp


def _fast_spec(steps: int) -> TaskSpec:
    import dataclasses

    spec = TaskSpec()
    return dataclasses.replace(
        spec, sft=dataclasses.replace(spec.sft, max_steps=steps, target_accuracy=None)
    )
