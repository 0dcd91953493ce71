"""Dataset loading and prompt rendering for the sampler."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from dapo.data.dataset import (
    DAPO_PREFIX,
    DatasetError,
    PromptRow,
    apply_dapo_template,
    load_dataset,
    load_default_or_files,
    render_prompt,
)
from dapo.data.task import prepare_default_task
from dapo.data.task.problems import Problem, to_row
from dapo.data.task.tokenizer import save_byte_tokenizer

AIME = Path("/work/shared/data/aime-2024.parquet")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    save_byte_tokenizer(directory)
    return AutoTokenizer.from_pretrained(str(directory))


def _rows(n: int) -> list[dict]:
    return [to_row(Problem(i, "+", 2 * i), i, "train") for i in range(n)]


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---- real file ---------------------------------------------------------------


@pytest.mark.skipif(not AIME.is_file(), reason=f"{AIME} is not present on this machine")
def test_aime_2024_loads_and_already_carries_the_dapo_template(tokenizer):
    rows = load_dataset(AIME)
    assert len(rows) == 960
    assert [r.index for r in rows] == list(range(960))
    assert len({r.messages[0]["content"] for r in rows}) == 30
    assert len({(r.messages[0]["content"], r.ground_truth) for r in rows}) == 30
    assert all(r.ground_truth.strip().isdigit() for r in rows)  # AIME answers are integers
    row = rows[0]
    assert row.data_source and row.ability and "raw_problem" in row.extra_info
    assert apply_dapo_template(row.extra_info["raw_problem"]) == row.messages[0]["content"]
    rendered = render_prompt(row, tokenizer, template="dapo", apply_chat_template=True)
    assert rendered == row.messages[0]["content"]  # no chat template, no double wrapping


# ---- JSONL and parquet --------------------------------------------------------


def test_jsonl_and_parquet_load_the_same_rows(tmp_path):
    records = _rows(5)
    pq.write_table(pa.Table.from_pylist(records), str(tmp_path / "d.parquet"))
    from_parquet = load_dataset(tmp_path / "d.parquet")
    from_jsonl = load_dataset(_write_jsonl(tmp_path / "d.jsonl", records))
    assert from_parquet == from_jsonl
    assert from_jsonl[3] == PromptRow(
        index=3,
        data_source=records[3]["data_source"],
        messages=[{"role": "user", "content": "3+6="}],
        ground_truth="9",
        ability=records[3]["ability"],
        extra_info={"index": 3, "split": "train"},
    )


def test_several_files_number_rows_across_files(tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", _rows(3))
    b = _write_jsonl(tmp_path / "b.jsonl", _rows(2))
    rows = load_dataset([a, b])
    assert [r.index for r in rows] == [0, 1, 2, 3, 4]
    assert rows[3].ground_truth == "0"


def _drop_truth(r):
    del r["reward_model"]["ground_truth"]


BAD_ROWS = {
    "no ground truth": (_drop_truth, "reward_model.ground_truth"),
    "empty ground truth": (lambda r: r["reward_model"].update(ground_truth="  "), "ground_truth"),
    "int ground truth": (lambda r: r["reward_model"].update(ground_truth=5), "ground_truth"),
    "no reward_model": (lambda r: r.pop("reward_model"), "reward_model"),
    "no prompt": (lambda r: r.pop("prompt"), "missing prompt"),
    "empty prompt": (lambda r: r.update(prompt=[]), "missing prompt"),
    "no content": (lambda r: r["prompt"][0].pop("content"), "prompt[0].content"),
    "blank content": (lambda r: r["prompt"][0].update(content=" "), "missing prompt"),
    "bad extra_info": (lambda r: r.update(extra_info=[1]), "extra_info"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_jsonl_row_is_reported_with_file_row_and_field(tmp_path, case):
    break_row, field = BAD_ROWS[case]
    records = _rows(5)
    break_row(records[3])
    path = _write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(DatasetError) as err:
        load_dataset(path)
    message = str(err.value)
    assert message.startswith(f"{path}: row 3: ") and field in message


def test_bad_parquet_row_is_reported_with_its_row_number(tmp_path):
    records = _rows(6)
    records[4]["reward_model"]["ground_truth"] = None
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(records), str(path))
    with pytest.raises(DatasetError, match=r"bad\.parquet: row 4: .*reward_model\.ground_truth"):
        load_dataset(path)


def test_unreadable_files_are_named(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(tmp_path / "absent.parquet")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DatasetError, match="unsupported"):
        load_dataset(tmp_path / "d.csv")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DatasetError, match="no rows"):
        load_dataset(tmp_path / "e.jsonl")
    (tmp_path / "f.jsonl").write_text(json.dumps(_rows(1)[0]) + "\n\n{oops\n")
    with pytest.raises(DatasetError, match=r"row 1 \(line 3\): invalid JSON"):
        load_dataset(tmp_path / "f.jsonl")
    (tmp_path / "g.parquet").write_text("not parquet")
    with pytest.raises(DatasetError, match="parquet"):
        load_dataset(tmp_path / "g.parquet")


def test_string_prompt_is_one_user_message(tmp_path):
    record = _rows(1)[0]
    record["prompt"] = "2+2="
    rows = load_dataset(_write_jsonl(tmp_path / "s.jsonl", [record]))
    assert rows[0].messages == [{"role": "user", "content": "2+2="}]


# ---- rendering ---------------------------------------------------------------


def _row(content: str) -> PromptRow:
    return PromptRow(0, "src", [{"role": "user", "content": content}], "4")


def test_render_without_template_is_the_content(tokenizer):
    assert (
        render_prompt(_row("2+2="), tokenizer, template="none", apply_chat_template=True) == "2+2="
    )


def test_dapo_template_wraps_once(tokenizer):
    once = render_prompt(_row("2+2="), tokenizer, template="dapo", apply_chat_template=False)
    assert once.startswith(DAPO_PREFIX + "\n\n2+2=\n\n")
    assert once.endswith('Remember to put your answer on its own line after "Answer:".')
    assert render_prompt(_row(once), tokenizer, template="dapo", apply_chat_template=False) == once


def test_chat_template_applied_with_generation_prompt(tmp_path):
    save_byte_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    row = _row("2+2=")
    assert (
        render_prompt(row, tok, template="none", apply_chat_template=True)
        == "<user>2+2=\n<assistant>"
    )
    assert render_prompt(row, tok, template="none", apply_chat_template=False) == "2+2="
    wrapped = render_prompt(row, tok, template="dapo", apply_chat_template=True)
    assert wrapped.startswith("<user>" + DAPO_PREFIX) and wrapped.endswith("<assistant>")


# ---- default task ------------------------------------------------------------


def test_default_task_name_resolves_to_its_split_files(tmp_path):
    task = prepare_default_task(tmp_path, progress=False, sft_steps=1)
    stamp = os.stat(tmp_path / "task.json").st_mtime_ns
    val = load_default_or_files(["default-task"], tmp_path, split="val", sft_steps=1)
    train = load_default_or_files(["default-task"], tmp_path, split="train", sft_steps=1)
    assert (len(train), len(val)) == (task.num_train, task.num_val)
    assert os.stat(tmp_path / "task.json").st_mtime_ns == stamp  # cache reused, not rebuilt
    extra = _write_jsonl(tmp_path / "extra.jsonl", _rows(2))
    mixed = load_default_or_files(["default-task", str(extra)], tmp_path, split="val", sft_steps=1)
    assert len(mixed) == task.num_val + 2 and mixed[-1].index == task.num_val + 1


def test_invalid_utf8_names_its_row(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = b'{"prompt": "1+1=", "reward_model": {"ground_truth": "2"}}\n'
    path.write_bytes(
        good + good + b'{"prompt": "\xff\xfe", "reward_model": {"ground_truth": "1"}}\n'
    )
    with pytest.raises(DatasetError, match=r"row 2 \(line 3\): not valid UTF-8"):
        load_dataset(path)
