"""Train TRL's GRPOTrainer on the default task and print its throughput as one JSON line.

Runs in its own virtualenv (TRL, accelerate, datasets, torch, transformers), not in the
project's. The project is not installed there: the repository root goes on ``sys.path`` so
that the reward is the project's own rule-based verifier (stdlib-only imports in ``dapo``
mode).

The batch mirrors ``configs/cpu-small.yaml``: 16 prompts x ``num_generations`` 8 = 128
completions per optimizer step, at most 16 new tokens, temperature 1, top_p 1, lr 2e-4,
clip 0.2 / 0.28, no KL term (beta 0), ``loss_type="dapo"`` (token-mean over the batch).
In TRL >= 0.20 ``per_device_train_batch_size`` counts completions, so 128 with one
accumulation step makes every optimizer step generate and train on exactly one batch of
16 groups (``steps_per_generation`` 1, ``generation_batch_size`` 128).

Usage::

    python bench/trl_grpo_run.py --model DIR --prompts FILE.json [--steps 30 --warmup 3]

``FILE.json`` is a list of ``{"prompt": str, "ground_truth": str}`` (prompts already
rendered to the text the policy continues from). Output (stdout, last line)::

    {"samples_per_s": ..., "steps": ..., "seconds": ..., "trl_version": ...}

where ``samples_per_s`` = completions trained per second over the timed steps only
(model loading, trainer set-up and the warm-up steps are excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

# Nothing may be fetched from a hub, and no tracker may start.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

PROMPTS_PER_STEP = 16
NUM_GENERATIONS = 8


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path, help="model dir (weights + tokenizer)")
    p.add_argument("--prompts", required=True, type=Path, help="JSON list of prompt rows")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def verifier_reward(completions: list, ground_truth: list[str], **_: object) -> list[float]:
    """+1 / -1 per completion from the project's ``dapo``-mode verifier."""
    from dapo.reward.verify import verify

    return [float(verify(c, gt).score) for c, gt in zip(completions, ground_truth, strict=True)]


def make_step_clock():
    """A TrainerCallback recording the wall time at the end of every optimizer step."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.marks: dict[int, float] = {}  # global step -> perf_counter at its end

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003
            self.marks[state.global_step] = time.perf_counter()

    return StepClock()


def grpo_config(args: argparse.Namespace, output_dir: str):
    """GRPOConfig for the cpu-small batch; raises if TRL rejects one of these fields."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=output_dir,
        use_cpu=True,
        seed=args.seed,
        max_steps=args.warmup + args.steps,
        per_device_train_batch_size=PROMPTS_PER_STEP * NUM_GENERATIONS,  # completions
        gradient_accumulation_steps=1,
        num_generations=NUM_GENERATIONS,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        learning_rate=2e-4,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=5,
        weight_decay=0.1,
        max_grad_norm=1.0,
        beta=0.0,
        epsilon=0.2,
        epsilon_high=0.28,
        num_iterations=1,
        loss_type="dapo",
        scale_rewards="group",
        use_vllm=False,
        bf16=False,
        fp16=False,
        save_strategy="no",
        eval_strategy="no",
        logging_steps=10_000,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        log_completions=False,
    )


def summarize(marks: dict[int, float], warmup: int, steps: int) -> dict[str, float]:
    """Throughput over steps ``warmup + 1 .. warmup + steps`` from the step-end times."""
    missing = {warmup, warmup + steps} - set(marks)
    if missing:
        raise RuntimeError(f"training stopped before step(s) {sorted(missing)}")
    seconds = marks[warmup + steps] - marks[warmup]
    per_step = PROMPTS_PER_STEP * NUM_GENERATIONS
    # The median step is less sensitive than the mean to other processes on shared cores.
    median_s = statistics.median(
        marks[i] - marks[i - 1] for i in range(warmup + 1, warmup + steps + 1)
    )
    return {
        "samples_per_s": steps * per_step / seconds,
        "steps": steps,
        "seconds": seconds,
        "median_step_s": median_s,
        "median_step_samples_per_s": per_step / median_s,
    }


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    import datasets
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    rows = json.loads(args.prompts.read_text())
    if not rows or not {"prompt", "ground_truth"} <= set(rows[0]):
        raise ValueError(f"{args.prompts}: expected a non-empty list of {{prompt, ground_truth}}")
    train = datasets.Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32)
    clock = make_step_clock()
    with tempfile.TemporaryDirectory(prefix="trl-grpo-") as out:
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=verifier_reward,
            args=grpo_config(args, out),
            train_dataset=train,
            processing_class=tokenizer,
            callbacks=[clock],
        )
        trainer.train()
    figures = summarize(clock.marks, args.warmup, args.steps)
    versions = {"trl_version": trl.__version__, "transformers_version": transformers.__version__}
    print(json.dumps({**figures, **versions, "torch_version": torch.__version__}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
