"""The build steps of the default task: data files, model directory, warm start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dapo.data.task.model import build_model, count_parameters
from dapo.data.task.problems import Problem, all_problems, split_problems, write_parquet
from dapo.data.task.sft import sampled_accuracy, train_sft
from dapo.data.task.spec import TaskSpec
from dapo.data.task.tokenizer import save_byte_tokenizer

# Seed offset of the final base-accuracy measurement, distinct from the seeds
# the early-stop evaluations use (their step numbers).
BASE_EVAL_SEED = 1_000_003


def build_data(
    spec: TaskSpec, train_file: Path, val_file: Path
) -> tuple[list[Problem], list[Problem]]:
    """Write the disjoint train/val parquet files; returns the problems."""
    problems = all_problems(spec.max_operand, spec.ops)
    train, val = split_problems(problems, spec.n_val, spec.n_train, spec.seed)
    train_file.parent.mkdir(parents=True, exist_ok=True)
    write_parquet(train, "train", train_file)
    write_parquet(val, "val", val_file)
    return train, val


def build_model_dir(spec: TaskSpec, model_dir: Path):
    """Save the tokenizer and the freshly initialised model; returns the model."""
    model_dir.mkdir(parents=True, exist_ok=True)
    save_byte_tokenizer(model_dir)
    model = build_model(spec.shape, spec.seed)
    model.save_pretrained(str(model_dir))
    return model


def warm_start(
    model, tokenizer, train: list[Problem], val: list[Problem], spec: TaskSpec, progress: bool
) -> dict[str, Any]:
    """Supervised warm start with a progress bar, then the held-out sampled accuracy."""
    from tqdm.auto import tqdm

    bar = tqdm(
        total=spec.sft.max_steps,
        desc="default-task warm start",
        unit="step",
        disable=not progress,
        mininterval=1.0,
    )
    last: dict[str, float] = {}

    def on_step(step: int, loss: float, acc: float | None) -> None:
        last["loss"] = loss
        if acc is not None:
            last["val_acc"] = acc
        bar.update(1)
        if step % 10 == 0 or acc is not None:
            bar.set_postfix({k: f"{v:.3f}" for k, v in last.items()}, refresh=False)

    try:
        result = train_sft(model, tokenizer, train, val, spec.sft, on_step=on_step)
    finally:
        bar.close()
    base = sampled_accuracy(
        model,
        tokenizer,
        val,
        max_new_tokens=spec.sft.max_new_tokens,
        seed=BASE_EVAL_SEED + spec.seed,
        samples=spec.base_eval_samples,
    )
    return {
        "base_accuracy": base,
        "num_parameters": count_parameters(model),
        "sft_steps": result.steps,
        "sft_final_loss": result.final_loss,
        "sft_history": result.history,
    }
