"""Learner memory on CPU: start-up, checkpoint and log-prob peaks (resident set, MiB).

Model: a random Qwen2-shaped model (GQA, SwiGLU, RMSNorm, rotary, untied head as in
Qwen2.5-32B) of ~248M parameters, ~950 MiB in float32, sharded over 2 gloo ranks
started by torchrun, as the learner runs under ``torchrun --nproc_per_node=N``. Peaks
are exact: a process resets its resident-set high-water mark (``/proc/self/clear_refs``)
before a stage and reads ``VmHWM`` after; freed tensors leave the resident set
(``MALLOC_MMAP_THRESHOLD_``), so repetitions in one process do not hide each other.

- ``learner.model_mb``: the model's weights;
- ``learner.rank1_peak_start_mb``: rank 1 building its sharded model (meta, shard,
  weights broadcast by rank 0) above its resident set before; goal: far from a model;
- ``learner.rank0_peak_start_mb``: the same on rank 0, which reads the files 64 MiB at a
  time here (the learner reads 1 GiB at a time: the same fraction of a 32B model);
- ``learner.checkpoint_peak_extra_mb``: rank 0 during ``save_sharded_checkpoint`` (DCP
  shards of the model and of the AdamW state, then the HF copy streamed one parameter
  at a time) above its resident set before; goal: far below a model;
- ``learner.logprob_peak_mb`` / ``learner.logprob_full_peak_mb``: one forward + backward
  of response log-probs (and the entropy metric, no bonus) (B 1, T 4096, vocabulary 32768, one decoder layer
  of hidden 512), chunked by 512 positions / the former full-logits path.

Each is the median of 3 repetitions, with ``_min`` and ``_max``.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
REPEATS = 3
MODEL = dict(
    vocab_size=32768,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=4,
    tie_word_embeddings=False,
)
HEAD = dict(vocab_size=32768, hidden_size=512, intermediate_size=1024, num_hidden_layers=1)
SEQ = 4096


def reset_peak() -> float:
    """Resets the peak resident set to the current one; the current one in MiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def peak_mb() -> float:
    return _status_mb("VmHWM")


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # freed tensors go back to the system
    return env


def _save_model(path: Path) -> float:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**MODEL, max_position_embeddings=SEQ))
    model.save_pretrained(path)
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def _rank_main(root: Path) -> None:
    """One torchrun rank: REPEATS x (build the sharded model, give it AdamW state, save)."""
    import torch.distributed as dist

    from proto.runspec import RunSpec
    from services.learner import model_init
    from services.learner.distributed import save_sharded_checkpoint
    from services.learner.ranks import init_ranks
    from services.learner.trainer import Trainer

    torch.set_num_threads(1)
    ranks = init_ranks("cpu")
    model_init.LOAD_BATCH_BYTES = 64 << 20
    spec = RunSpec()
    mine: dict[str, list[float]] = {"start": [], "checkpoint": []}
    for rep in range(REPEATS):
        gc.collect()
        dist.barrier()
        before = reset_peak()
        source = root / "model" if ranks.rank == 0 else None  # only rank 0 reads files
        model = model_init.load_sharded(source, spec, ranks, frozen=False, weights=True)
        mine["start"].append(peak_mb() - before)
        trainer = Trainer(model, spec, "cpu", pad_id=0, ranks=ranks)
        for p in model.parameters():  # AdamW state (exp_avg, exp_avg_sq) as after a step
            p.grad = torch.zeros_like(p)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        dist.barrier()
        before = reset_peak()
        ckpt = save_sharded_checkpoint(
            ranks, root / "ckpt", rep + 1, model, None, trainer.state(), trainer.optimizer
        )
        mine["checkpoint"].append(peak_mb() - before)
        if ranks.rank == 0:
            shutil.rmtree(ckpt)
        del model, trainer
    figures: list = [None] * ranks.world
    dist.all_gather_object(figures, mine)
    if ranks.rank == 0:
        (root / "ranks.json").write_text(json.dumps(figures))
    dist.destroy_process_group()


def _logprob_main(mode: str) -> None:
    """One forward + backward of response log-probs and entropies; prints the peak MiB."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dapo.algorithm.loss import entropy_from_logits, token_log_probs
    from services.learner.logprobs import response_log_probs

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**HEAD, max_position_embeddings=SEQ + 8)).eval()
    ids = torch.randint(0, HEAD["vocab_size"], (1, SEQ + 1))
    inputs, mask = ids[:, :-1], torch.ones_like(ids[:, :-1])
    pos, tokens = torch.arange(SEQ)[None], ids[:, 1:]  # every position predicts the next
    before = reset_peak()
    if mode == "chunked":
        logp, _ = response_log_probs(
            model, inputs, mask, pos, tokens, temperature=1.0, with_entropy=True
        )
    else:  # the former path: (B, S, V) logits, gathered, upcast, divided, log-softmaxed
        logits = model(input_ids=inputs, attention_mask=mask).logits[:, pos[0]].float() / 1.0
        logp = token_log_probs(logits, tokens)
        with torch.no_grad():  # a metric only, as without an entropy bonus
            entropy_from_logits(logits)
    logp.sum().backward()
    print(json.dumps({"peak_mb": peak_mb() - before}))


def _summary(prefix: str, values: list[float]) -> dict[str, float]:
    return {
        prefix: statistics.median(values),
        f"{prefix}_min": min(values),
        f"{prefix}_max": max(values),
    }


def _logprob_peak(mode: str) -> float:
    cmd = [sys.executable, "-m", "bench.bench_learner_memory", "logprob", mode]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"]


def run() -> dict[str, float]:
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-learner-") as tmp:
        root = Path(tmp)
        out["learner.model_mb"] = _save_model(root / "model")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc_per_node=2", "-m", "bench.bench_learner_memory", "ranks", str(root)]
        proc = subprocess.run(
            cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900
        )
        if proc.returncode:
            raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-4000:])
        rank0, rank1 = json.loads((root / "ranks.json").read_text())
    out.update(_summary("learner.rank1_peak_start_mb", rank1["start"]))
    out.update(_summary("learner.rank0_peak_start_mb", rank0["start"]))
    out.update(_summary("learner.checkpoint_peak_extra_mb", rank0["checkpoint"]))
    for mode, name in (("chunked", "logprob_peak_mb"), ("full", "logprob_full_peak_mb")):
        out.update(_summary(f"learner.{name}", [_logprob_peak(mode) for _ in range(REPEATS)]))
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["ranks"]:
        _rank_main(Path(sys.argv[2]))
    elif sys.argv[1:2] == ["logprob"]:
        _logprob_main(sys.argv[2])
    else:
        print(run())
