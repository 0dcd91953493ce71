"""Supervised warm start of the default task and its sampled held-out accuracy.

Plain next-token cross-entropy on ``prompt -> response + EOS`` with the loss on
response tokens only, AdamW, CPU. Training stops after ``max_steps`` or, when
``target_accuracy`` is set, at the first evaluation whose sampled validation
accuracy (temperature 1, full vocabulary) reaches it: the RL starting point
must be neither hopeless nor solved. Evaluation seeds its own sampling, so the
same settings and thread count give the same weights and the same stop step.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from dapo.data.task.problems import Problem, response_text

IGNORE = -100


@dataclass(frozen=True)
class SftSettings:
    """Knobs of the warm start; part of the cache fingerprint."""

    max_steps: int = 2000
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    eval_every: int = 50
    eval_problems: int = 256
    target_accuracy: float | None = 0.45
    max_new_tokens: int = 12
    seed: int = 0


@dataclass(frozen=True)
class SftResult:
    steps: int
    final_loss: float
    history: list[tuple[int, float]] = field(default_factory=list)
    """(step, sampled validation accuracy) at each evaluation."""


def encode_example(tokenizer, problem: Problem) -> tuple[list[int], int]:
    """Token ids of prompt + response + EOS, and the prompt length."""
    prompt = tokenizer.encode(problem.text, add_special_tokens=False)
    response = tokenizer.encode(response_text(problem.answer), add_special_tokens=False)
    return prompt + response + [tokenizer.eos_token_id], len(prompt)


def collate(
    examples: Sequence[tuple[list[int], int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) input ids, attention mask and labels (prompt and pad = IGNORE)."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
        labels[row, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
    return input_ids, mask, labels


def extract_answer(completion: str) -> str | None:
    """The text after ``Answer:`` on the last line that has it (case-insensitive)."""
    for line in reversed(completion.strip().splitlines()):
        head, sep, tail = line.partition(":")
        if sep and head.strip().lower() == "answer":
            return tail.strip()
    return None


@torch.no_grad()
def sample_completions(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    seed: int,
    top_p: float = 1.0,
    batch_size: int = 256,
) -> list[str]:
    """One temperature-1 sample per prompt, decoded without EOS.

    The global torch RNG is seeded for the call and restored afterwards, so
    evaluation neither depends on nor disturbs the caller's random state.
    """
    was_training = model.training
    model.eval()
    tokenizer.padding_side = "left"  # generation continues from the right edge
    out: list[str] = []
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(
                **enc,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )  # (B, prompt + new)
            new = gen[:, enc["input_ids"].shape[1] :]
            out.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        torch.random.set_rng_state(rng_state)
        model.train(was_training)
    return out


def sampled_accuracy(
    model,
    tokenizer,
    problems: Sequence[Problem],
    *,
    max_new_tokens: int,
    seed: int,
    samples: int = 1,
    top_p: float = 1.0,
) -> float:
    """Fraction of ``samples`` temperature-1 samples per problem with the right answer."""
    prompts = [p.text for p in problems] * samples
    completions = sample_completions(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, seed=seed, top_p=top_p
    )
    truths = [str(p.answer) for p in problems] * samples
    hits = sum(extract_answer(c) == t for c, t in zip(completions, truths, strict=True))
    return hits / max(len(prompts), 1)


def lr_factor(step: int, warmup: int) -> float:
    """Linear warm-up to 1, then constant (early stopping needs no horizon)."""
    return min(1.0, (step + 1) / max(warmup, 1))


def train_sft(
    model,
    tokenizer,
    train: Sequence[Problem],
    val: Sequence[Problem],
    settings: SftSettings,
    on_step: Callable[[int, float, float | None], None] | None = None,
) -> SftResult:
    """Run the warm start in place on ``model``.

    ``on_step(step, loss, val_accuracy_or_None)`` is called after every step
    (for progress display). Batches are drawn from seeded epoch permutations.
    """
    rng = random.Random(settings.seed)
    examples = [encode_example(tokenizer, p) for p in train]
    eval_set = list(val[: settings.eval_problems])
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, settings.warmup_steps))
    model.train()
    history: list[tuple[int, float]] = []
    order: list[int] = []
    loss_value = math.nan
    step = 0
    for step in range(1, settings.max_steps + 1):
        if len(order) < settings.batch_size:
            order.extend(rng.sample(range(len(examples)), len(examples)))
        batch = [examples[order.pop()] for _ in range(settings.batch_size)]
        input_ids, mask, labels = collate(batch, tokenizer.pad_token_id)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_value = loss.item()
        acc = None
        if settings.target_accuracy is not None and step % settings.eval_every == 0:
            acc = sampled_accuracy(
                model, tokenizer, eval_set, max_new_tokens=settings.max_new_tokens, seed=step
            )
            history.append((step, acc))
        if on_step is not None:
            on_step(step, loss_value, acc)
        if acc is not None and acc >= settings.target_accuracy:
            break
    model.eval()
    return SftResult(steps=step, final_loss=loss_value, history=history)
