"""``make gpu-check``: what one CUDA GPU can tell about the system, in one unattended run of
under 8 minutes, written to ``.bench/gpu.json``.

Run it with any python that imports a CUDA torch and this project's dependencies, from the
repository root: ``PYTHONPATH=. python3 bench/gpu_check.py`` (``make gpu-check`` does that
with ``GPU_PYTHON``, default ``python3``; it installs nothing). Steps:

1. the ``gpu``-marked tests (``pytest -m gpu``): a bf16 mixed-precision learner step with
   float32 master weights, the HF engine's log-probs against the learner's recomputation
   on CUDA, and a short end-to-end loop on one FSDP2 rank under torchrun with NCCL (HF
   engine in bf16 generates, the learner trains in bf16, the weights go back into the
   engine, a few steps, then a DCP checkpoint);
2. throughput on a Qwen2-shaped random model of Qwen2.5-0.5B's shape (~494M parameters,
   made locally, nothing downloaded): ``gpu.generation_tokens_per_s`` (HF engine, bf16,
   8 prompts x 8 samples x 256 new tokens) and ``gpu.learner_tokens_per_s`` (one DAPO step
   on that batch, bf16 autocast over float32 master weights: proximal log-probs, forward,
   backward, AdamW; prompt + response tokens per second). Medians of ``--repeats`` runs
   after one warm-up, with ``_min`` and ``_max``.

Two processes cannot share one GPU in an NCCL group: the learner-to-rollout weight broadcast
over NCCL (and the service stack on CUDA, whose weight sync is that broadcast) needs two
GPUs; the gpu tests that need two skip on one (``NCCL_NOTE`` names them). Without CUDA the
check exits 3 with a message, doing nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from proto.messages import BatchStats, ScoredGroup, ScoredSample, TrainingBatch
from proto.runspec import RunSpec

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / ".bench" / "gpu.json"
NO_CUDA_EXIT = 3
NCCL_NOTE = (
    "not checked here: the NCCL weight broadcast from the learner to rollout workers. Two "
    "processes cannot share one GPU in an NCCL group, so it needs two GPUs; the gpu tests "
    "that need two (the service stack in tests/gpu/test_e2e_two_gpus.py, NCCL failure "
    "handling in tests/dapo/weights/test_nccl_sync.py) skip on one and run where two exist."
)
SHAPES = {
    # Qwen2.5-0.5B's shape: GQA (14 query heads, 2 key-value heads), SwiGLU, tied embeddings
    "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                 num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2),
    "tiny": dict(vocab_size=256, hidden_size=32, intermediate_size=64,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
}  # fmt: skip
EOS, PAD = 1, 0


@dataclass(frozen=True)
class Workload:
    prompts: int = 8
    n: int = 8
    prompt_len: int = 128
    new_tokens: int = 256
    micro_batch: int = 16
    """Samples per learner forward/backward."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="make gpu-check: GPU tests and GPU throughput")
    p.add_argument("--out", type=Path, default=OUT, help="where to write the JSON results")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure (>= 1)")
    p.add_argument("--size", choices=sorted(SHAPES), default="0.5b", help="benchmark model")
    p.add_argument("--tests-timeout", type=int, default=330, help="seconds for pytest -m gpu")
    p.add_argument("--skip-tests", action="store_true", help="throughput only")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.tests_timeout < 10:
        p.error(f"--tests-timeout must be >= 10 seconds, got {args.tests_timeout}")
    return args


def cuda_problem() -> str | None:
    """Why this process cannot run the check on a GPU, or None."""
    if torch.cuda.is_available():
        return None
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
    return (f"no CUDA GPU visible to {sys.executable} (torch {torch.__version__}, {build}, "
            f"CUDA_VISIBLE_DEVICES={visible}): make gpu-check needs a GPU and a CUDA torch; "
            "set GPU_PYTHON to a python that has them")  # fmt: skip


def qwen2_config(size: str) -> Qwen2Config:
    return Qwen2Config(**SHAPES[size], max_position_embeddings=4096, tie_word_embeddings=True,
                       eos_token_id=EOS, pad_token_id=PAD)  # fmt: skip


def param_count(size: str) -> int:
    """Parameters of a shape, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        return sum(p.numel() for p in Qwen2ForCausalLM(qwen2_config(size)).parameters())


def build_model(size: str, device: str, seed: int = 0) -> Qwen2ForCausalLM:
    """A random Qwen2 of ``size`` in float32 on ``device`` (the learner's master dtype)."""
    torch.manual_seed(seed)
    with torch.device(device):
        return Qwen2ForCausalLM(qwen2_config(size)).float()


def random_prompts(vocab: int, w: Workload, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(2, vocab, size=w.prompt_len).tolist() for _ in range(w.prompts)]


def scored_batch(prompts, outs, version: int = 0, batch_id: int = 0) -> TrainingBatch:
    """A training batch of engine completions (``outs[i]``: the samples of ``prompts[i]``),
    scored +1 / -1 alternately so that every group carries an advantage."""
    groups = []
    for gi, (prompt, comps) in enumerate(zip(prompts, outs, strict=True)):
        samples = [
            ScoredSample(response_ids=c.token_ids, logprobs=c.logprobs,
                         finish_reason=c.finish_reason, versions=[version], version_starts=[0],
                         score=1.0 if j % 2 else -1.0, acc=bool(j % 2), overlong_penalty=0.0,
                         length=len(c.token_ids), truncated=c.finish_reason == "length")
            for j, c in enumerate(comps)
        ]  # fmt: skip
        groups.append(
            ScoredGroup(run_id="gpu-check", group_id=f"b{batch_id}-g{gi}", prompt_id=str(gi),
                        prompt_ids=np.array(prompt), ground_truth="1", n=len(comps),
                        policy_version=version, worker_id="gpu-check", engine="hf",
                        gen_seconds=0.0, samples=samples)
        )  # fmt: skip
    return TrainingBatch(run_id="gpu-check", batch_id=batch_id, groups=groups,
                         stats=BatchStats(kept=len(groups)))  # fmt: skip


def restamp(batch: TrainingBatch, version: int) -> TrainingBatch:
    """``batch`` as if policy ``version`` had generated every token."""
    groups = []
    for g in batch.groups:
        samples = [s.model_copy(update={"versions": np.array([version], dtype=np.int32)})
                   for s in g.samples]  # fmt: skip
        groups.append(g.model_copy(update={"samples": samples, "policy_version": version}))
    return batch.model_copy(update={"groups": groups})


def learner_spec(w: Workload) -> RunSpec:
    """One optimizer step per batch, bf16 compute over float32 master weights."""
    return RunSpec.model_validate({
        "data": {"train_batch_size": w.prompts, "max_prompt_length": w.prompt_len,
                 "max_response_length": w.new_tokens},
        "rollout": {"n": w.n},
        "actor": {"ppo_mini_batch_size": w.prompts, "ppo_micro_batch_size": w.micro_batch,
                  "fsdp_config": {"mixed_precision": {"param_dtype": "bf16"}},
                  "optim": {"lr": 1e-6, "lr_warmup_steps": 0}},
        "reward": {"overlong_buffer": {"len": w.new_tokens // 4}},
    })  # fmt: skip


def timed(fn: Callable[[], object], repeats: int, sync: bool) -> tuple[list[float], object]:
    """Seconds of ``repeats`` calls after one untimed warm-up, and the last result."""
    out = fn()
    seconds = []
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if sync:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    return seconds, out


def rate(name: str, amount: float, seconds: list[float]) -> dict[str, float]:
    """``amount`` per second: median over runs, with _min and _max."""
    rates = [amount / s for s in seconds]
    return {name: statistics.median(rates), f"{name}_min": min(rates), f"{name}_max": max(rates)}


def bench_generation(model, device: str, w: Workload, repeats: int):
    """Generated tokens per second of the HF engine in bf16, and the batch it generated."""
    from dapo.engines.hf import HFEngine
    from proto.messages import SamplingParams

    # a copy: the engine casts its model in place, the learner keeps float32 master weights
    engine = HFEngine(copy.deepcopy(model), eos=[EOS], device=device, dtype=torch.bfloat16)
    prompts = random_prompts(model.config.vocab_size, w)
    params = SamplingParams(n=w.n, max_new_tokens=w.new_tokens, seed=0)
    seconds, outs = timed(lambda: engine.generate(prompts, params), repeats, device != "cpu")
    tokens = sum(len(c.token_ids) for group in outs for c in group)
    return rate("gpu.generation_tokens_per_s", tokens, seconds), scored_batch(prompts, outs)


def bench_learner(model, device: str, batch: TrainingBatch, w: Workload, repeats: int):
    """Trained (prompt + response) tokens per second of a DAPO step, bf16 over float32."""
    from services.learner.trainer import Trainer

    trainer = Trainer(model, learner_spec(w), device, pad_id=PAD)
    tokens = sum(len(g.prompt_ids) + s.length for g in batch.groups for s in g.samples)
    # each step trains the batch as if the current weights had generated it (lag 0)
    step = lambda: trainer.train_batch(restamp(batch, trainer.version))  # noqa: E731
    seconds, figures = timed(step, repeats, device != "cpu")
    if not np.isfinite(figures["loss"]) or trainer.version != repeats + 1:
        raise RuntimeError(f"learner step failed: loss {figures['loss']}, v{trainer.version}")
    return rate("gpu.learner_tokens_per_s", tokens, seconds)


def gpu_test_files() -> list[str]:
    """The test files with ``gpu``-marked tests: only these are collected, so a CPU-only test
    needing a package the GPU machine lacks cannot stop the run."""
    found = [p for p in sorted((ROOT / "tests").rglob("test_*.py"))
             if "pytest.mark.gpu" in p.read_text(encoding="utf-8")]  # fmt: skip
    return [str(p.relative_to(ROOT)) for p in found]


def run_gpu_tests(timeout_s: int) -> dict:
    """``pytest -m gpu`` in a child process; outcome per test from its JUnit XML."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", f"--junitxml={xml}",
               "-o", "addopts=-p no:cacheprovider --import-mode=importlib",
               *gpu_test_files()]  # fmt: skip
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, timeout=timeout_s, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout or ""
            tail = (out.decode(errors="replace") if isinstance(out, bytes) else out)[-3000:]
            print(tail, flush=True)
            return {"ok": False, "problem": f"pytest -m gpu ran past {timeout_s} s", "tail": tail}
        print(proc.stdout[-6000:], flush=True)
        cases = _junit_cases(xml) if xml.is_file() else {}
        outcomes = list(cases.values())
        return {
            "ok": proc.returncode == 0,
            "exit": proc.returncode,
            "seconds": time.perf_counter() - t0,
            **{k: outcomes.count(k) for k in ("passed", "failed", "error", "skipped")},
            "cases": cases,
        }


def _junit_cases(xml: Path) -> dict[str, str]:
    cases = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        outcome = next((k for k in ("failure", "error", "skipped") if k in kinds), "passed")
        name = f"{case.get('classname')}::{case.get('name')}"
        cases[name] = {"failure": "failed"}.get(outcome, outcome)
    return cases


def bench_throughput(size: str, w: Workload, repeats: int) -> dict[str, float]:
    device = "cuda"
    torch.cuda.reset_peak_memory_stats()
    model = build_model(size, device)
    figures, batch = bench_generation(model, device, w, repeats)
    figures.update(bench_learner(model, device, batch, w, repeats))
    figures["gpu.peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    figures["gpu.model_params_m"] = param_count(size) / 1e6
    return figures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (why := cuda_problem()) is not None:
        print(f"gpu-check: {why}", file=sys.stderr)
        return NO_CUDA_EXIT
    t0, w = time.perf_counter(), Workload()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "cuda": torch.version.cuda, "model": args.size, "workload": asdict(w),
              "notes": [NCCL_NOTE]}  # fmt: skip
    print(f"gpu-check on {result['device']} (torch {result['torch']}, CUDA {result['cuda']})")
    ok = True
    if not args.skip_tests:
        result["tests"] = run_gpu_tests(args.tests_timeout)
        ok = result["tests"]["ok"]
    try:
        result["figures"] = bench_throughput(args.size, w, args.repeats)
    except Exception as exc:  # the tests' results are still worth writing
        result["figures_error"] = f"{type(exc).__name__}: {exc}"
        ok = False
    result["seconds"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    _print_summary(result, args.out)
    return 0 if ok else 1


def _print_summary(result: dict, out: Path) -> None:
    tests = result.get("tests")
    if tests is not None and "problem" in tests:
        print(f"gpu tests: FAILED: {tests['problem']}")
    elif tests is not None:
        counts = ", ".join(f"{tests[k]} {k}" for k in ("passed", "failed", "error", "skipped"))
        print(f"gpu tests: {counts}" + ("" if tests["ok"] else f" (pytest exit {tests['exit']})"))
    for k, v in result.get("figures", {}).items():
        print(f"   {k:<40} {v:>14.4g}")
    if "figures_error" in result:
        print(f"throughput: FAILED: {result['figures_error']}")
    print(f"NOTE: {NCCL_NOTE}")
    print(f"wrote {out} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    raise SystemExit(main())
