"""Load prompt datasets in the DAPO-Math / verl schema and render prompts.

A row holds ``data_source: str``, ``prompt: [{"role", "content"}, ...]``,
``ability: str``, ``reward_model: {"style", "ground_truth": str}`` and
``extra_info: {...}``; parquet and JSONL files with those fields are accepted.
Every row is validated when the file loads, so a row without a prompt or a
ground truth stops the run before it starts, with the file, the row number
(0-based, in file order) and the missing field named.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

DEFAULT_TASK = "default-task"

DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should "
    "be of the form Answer: $Answer (without quotes) where $Answer is the answer to the problem."
)
DAPO_SUFFIX = 'Remember to put your answer on its own line after "Answer:".'


class DatasetError(ValueError):
    """A dataset file or row that cannot be used; the message names file, row and field."""


@dataclass(frozen=True)
class PromptRow:
    """One validated prompt of a dataset."""

    index: int
    """Position in the loaded list (0-based, unique across the files loaded together)."""
    data_source: str
    messages: list[dict[str, str]]
    """Chat messages, each {"role": ..., "content": ...}; at least one."""
    ground_truth: str
    ability: str = ""
    extra_info: dict[str, Any] = field(default_factory=dict)


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(str(path)).to_pylist()
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise DatasetError(f"{path}: not a readable parquet file ({exc})") from exc


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DatasetError(
                    f"{path}: row {len(rows)} (line {line_no}): not valid UTF-8 "
                    f"(byte {exc.start} of the line)"
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(
                    f"{path}: row {len(rows)} (line {line_no}): invalid JSON ({exc.msg})"
                ) from exc
            if not isinstance(record, dict):
                raise DatasetError(f"{path}: row {len(rows)} (line {line_no}): not a JSON object")
            rows.append(record)
    return rows


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Raw records of a .parquet or .jsonl/.json-lines file."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: dataset file not found")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(path)
    raise DatasetError(f"{path}: unsupported dataset format {suffix!r} (use .parquet or .jsonl)")


def _messages(value: Any, where: str, prompt_key: str) -> list[dict[str, str]]:
    """The chat messages of one row; a bare string counts as one user message."""
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    if value is None or not isinstance(value, list | tuple) or len(value) == 0:
        raise DatasetError(f"{where}: missing prompt (field {prompt_key!r} is {value!r})")
    out: list[dict[str, str]] = []
    for k, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise DatasetError(f"{where}: {prompt_key}[{k}] is not a {{role, content}} message")
        role, content = msg.get("role"), msg.get("content")
        if not isinstance(role, str) or not role:
            raise DatasetError(f"{where}: missing prompt role ({prompt_key}[{k}].role)")
        if not isinstance(content, str):
            raise DatasetError(f"{where}: missing prompt content ({prompt_key}[{k}].content)")
        out.append({"role": role, "content": content})
    if not any(m["content"].strip() for m in out):
        raise DatasetError(f"{where}: missing prompt (every message of {prompt_key!r} is empty)")
    return out


def _ground_truth(record: dict[str, Any], where: str) -> str:
    reward_model = record.get("reward_model")
    if not isinstance(reward_model, dict):
        raise DatasetError(
            f"{where}: missing ground truth (field 'reward_model' is {reward_model!r})"
        )
    truth = reward_model.get("ground_truth")
    if not isinstance(truth, str) or not truth.strip():
        raise DatasetError(
            f"{where}: missing ground truth (field 'reward_model.ground_truth' is {truth!r}; "
            "a non-empty string is required)"
        )
    return truth


def _optional_str(record: dict[str, Any], name: str, where: str) -> str:
    value = record.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DatasetError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def validate_record(
    record: dict[str, Any], index: int, where: str, prompt_key: str = "prompt"
) -> PromptRow:
    """Check one raw record and turn it into a PromptRow (``where`` prefixes errors)."""
    extra = record.get("extra_info")
    if extra is None:
        extra = {}
    if not isinstance(extra, dict):
        raise DatasetError(
            f"{where}: field 'extra_info' must be a mapping, got {type(extra).__name__}"
        )
    return PromptRow(
        index=index,
        data_source=_optional_str(record, "data_source", where),
        messages=_messages(record.get(prompt_key), where, prompt_key),
        ground_truth=_ground_truth(record, where),
        ability=_optional_str(record, "ability", where),
        extra_info=dict(extra),
    )


def load_dataset(
    files: str | Path | Sequence[str | Path], *, prompt_key: str = "prompt"
) -> list[PromptRow]:
    """Load and validate every row of one or more files, in order."""
    paths = [files] if isinstance(files, str | Path) else list(files)
    if not paths:
        raise DatasetError("no dataset files given")
    rows: list[PromptRow] = []
    for path in paths:
        records = read_records(path)
        if not records:
            raise DatasetError(f"{path}: dataset file has no rows")
        for row_no, record in enumerate(records):
            rows.append(validate_record(record, len(rows), f"{path}: row {row_no}", prompt_key))
    return rows


def load_default_or_files(
    files: Sequence[str],
    cache_dir: str | Path | None = None,
    *,
    split: Literal["train", "val"] = "train",
    prompt_key: str = "prompt",
    sft_steps: int | None = None,
) -> list[PromptRow]:
    """Like load_dataset, with the name ``default-task`` standing for that task's split file.

    The default task is built into ``cache_dir`` on first use (see
    dapo.data.task.prepare_default_task; ``sft_steps`` selects its fast build).
    """
    resolved: list[str | Path] = []
    for name in files:
        if name == DEFAULT_TASK:
            from dapo.data.task import prepare_default_task

            task = prepare_default_task(Path(cache_dir) if cache_dir else None, sft_steps=sft_steps)
            resolved.append(task.train_file if split == "train" else task.val_file)
        else:
            resolved.append(name)
    return load_dataset(resolved, prompt_key=prompt_key)


def apply_dapo_template(problem: str) -> str:
    """Wrap a bare problem in the DAPO math prompt; text already wrapped is returned as is."""
    if DAPO_PREFIX in problem:
        return problem
    return f"{DAPO_PREFIX}\n\n{problem}\n\n{DAPO_SUFFIX}"


def render_prompt(
    row: PromptRow,
    tokenizer: Any,
    *,
    template: Literal["none", "dapo"],
    apply_chat_template: bool,
) -> str:
    """The text the policy continues from.

    ``template="dapo"`` wraps the last user message in the DAPO math prompt.
    With ``apply_chat_template`` and a tokenizer that has a chat template, the
    messages go through it with the generation prompt appended; otherwise the
    message contents are joined by blank lines (one message: its content).
    """
    messages = [dict(m) for m in row.messages]
    if template == "dapo":
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        target = users[-1] if users else len(messages) - 1
        messages[target]["content"] = apply_dapo_template(messages[target]["content"])
    elif template != "none":
        raise ValueError(f"unknown prompt template {template!r} (expected 'none' or 'dapo')")
    if apply_chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if not isinstance(text, str):
            raise TypeError(f"chat template rendered {type(text).__name__}, expected str")
        return text
    return "\n\n".join(m["content"] for m in messages)
