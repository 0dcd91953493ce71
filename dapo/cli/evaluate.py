"""Evaluating a checkpoint: sample k answers per problem, score them, report avg@k and friends.

Figures (k = samples per problem):
- ``acc/mean@k``: mean accuracy over all samples (the paper's avg@32);
- ``acc/best@k``: fraction of problems with at least one correct sample (pass@k);
- ``acc/maj@k``: fraction of problems whose most frequent prediction is correct;
- ``response_length/mean`` and ``truncated/frac``.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass

from tqdm import tqdm

from dapo.reward.verify import verify
from proto.messages import SamplingParams
from proto.vocab import RewardMode


@dataclass(frozen=True)
class EvalSpec:
    sampling: SamplingParams = SamplingParams(n=4, top_p=0.7, max_new_tokens=1024, seed=0)
    """k = ``sampling.n`` answers per problem; the seed of problem batch b is ``seed + b``."""
    batch: int = 16
    """Problems per generation call."""
    mode: RewardMode = "dapo"
    """Verifier."""


def evaluate(
    engine,
    tokenizer,
    rows,
    prompts_ids: list[list[int]],
    spec: EvalSpec,
    progress: bool = True,
    desc: str = "eval",
) -> dict[str, float]:
    """``rows[i]`` (a dataset PromptRow) was rendered and tokenised into ``prompts_ids[i]``."""
    t0 = time.perf_counter()
    correct = best = maj = total_len = truncated = 0
    bar = tqdm(total=len(rows), desc=desc, unit="problem", disable=not progress, leave=False)
    for start in range(0, len(rows), spec.batch):
        chunk = slice(start, start + spec.batch)
        params = spec.sampling.model_copy(update={"seed": (spec.sampling.seed or 0) + start})
        outs = engine.generate(prompts_ids[chunk], params)
        for row, completions in zip(rows[chunk], outs, strict=True):
            texts = tokenizer.batch_decode(
                [c.token_ids.tolist() for c in completions], skip_special_tokens=True
            )
            verdicts = [verify(t, row.ground_truth, mode=spec.mode) for t in texts]
            n_ok = sum(v.acc for v in verdicts)
            correct += n_ok
            best += n_ok > 0
            preds = Counter(v.pred for v in verdicts if v.pred)
            if preds:
                top = preds.most_common(1)[0][0]
                maj += any(v.acc and v.pred == top for v in verdicts)
            total_len += sum(len(c.token_ids) for c in completions)
            truncated += sum(c.finish_reason == "length" for c in completions)
        bar.update(len(outs))
    bar.close()
    n_samples = max(len(rows) * spec.sampling.n, 1)
    k = spec.sampling.n
    return {
        f"acc/mean@{k}": correct / n_samples,
        f"acc/best@{k}": best / max(len(rows), 1),
        f"acc/maj@{k}": maj / max(len(rows), 1),
        "response_length/mean": total_len / n_samples,
        "truncated/frac": truncated / n_samples,
        "problems": float(len(rows)),
        "eval_s": time.perf_counter() - t0,
    }


def prepare_prompts(rows, tokenizer, template: str, apply_chat_template: bool) -> list[list[int]]:
    from dapo.data.dataset import render_prompt

    return [
        tokenizer.encode(
            render_prompt(r, tokenizer, template=template, apply_chat_template=apply_chat_template),
            add_special_tokens=False,
        )
        for r in rows
    ]


def evaluate_model_dir(
    model_dir,
    rows,
    spec: EvalSpec,
    *,
    device: str = "cpu",
    template: str = "none",
    apply_chat_template: bool = True,
    progress: bool = True,
    desc: str = "eval",
) -> dict[str, float]:
    from transformers import AutoTokenizer

    from dapo.engines.hf import HFEngine

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    engine = HFEngine(str(model_dir), tokenizer, device=device)
    prompts = prepare_prompts(rows, tokenizer, template, apply_chat_template)
    return evaluate(engine, tokenizer, rows, prompts, spec, progress=progress, desc=desc)


def main(args) -> int:
    """``dapo eval``: see ``dapo eval --help``."""

    from dapo.data.dataset import load_default_or_files
    from dapo.data.models import pick_device

    rows = load_default_or_files([args.data], None, split="val")
    if args.limit:
        rows = rows[: args.limit]
    sampling = SamplingParams(
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )
    spec = EvalSpec(sampling, batch=args.batch, mode=args.mode)
    figures = evaluate_model_dir(
        args.model, rows, spec, device=pick_device(args.device), template=args.template
    )
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        for k, v in figures.items():
            print(f"{k:<24} {v:.4f}")
    return 0
