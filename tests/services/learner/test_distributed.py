"""The FSDP2-sharded learner on 2 real CPU ranks (gloo, started by torchrun) against the
single-process trainer: same update (also with activation checkpointing, and within bf16
tolerance with bf16 mixed precision), same versions, full-state gather, and sharded (DCP)
checkpoints whose HF copy reloads and whose training state resumes exactly.

The worker half of this file runs under ``torchrun`` (``python -m torch.distributed.run``);
rank 0 also trains an unsharded copy, compares, and writes its findings to a JSON file.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import torch
from transformers import AutoModelForCausalLM

from services.learner.distributed import STATE_DIR, check_resume_world
from services.learner.ranks import GroupRanks, SoloRanks, padded_share

ROOT = Path(__file__).resolve().parents[3]
CONFIGS = [  # both deal 3 micro-batches over 2 ranks: rank 1 runs a dummy
    {"ppo_mini_batch_size": 4, "ppo_micro_batch_size": 6},
    {"ppo_mini_batch_size": 2, "ppo_micro_batch_size": 3},
]


def test_padded_share_deals_round_robin_and_pads():
    assert padded_share(5, 0, 2) == [0, 2, 4]
    assert padded_share(5, 1, 2) == [1, 3, None]
    assert padded_share(2, 2, 3) == [None]
    for n in range(9):
        shares = [padded_share(n, r, 3) for r in range(3)]
        assert len({len(s) for s in shares}) == 1  # same number of calls on every rank
        dealt = sorted(i for s in shares for i in s if i is not None)
        assert dealt == list(range(n))


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(Path(__file__).resolve()),
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((out / "result.json").read_text()), out


def test_two_ranks_give_the_single_process_update(two_rank_run):
    result, _ = two_rank_run
    assert len(result["configs"]) == len(CONFIGS) + 1  # + activation checkpointing
    assert result["configs"][-1]["checkpointing"]
    for r in result["configs"]:
        assert r["max_param_diff"] < 1e-10, r
        assert r["moved"] > 1e-4, r  # the batch did change the weights
        assert r["version"] == r["single_version"] == r["expected_version"], r
        for k in ("loss", "grad_norm", "entropy", "pg_clipfrac_high"):
            assert abs(r["figures"][k] - r["single_figures"][k]) < 1e-9, (k, r)


def test_bf16_mixed_precision_keeps_fp32_master_weights_and_optimizer_state(two_rank_run):
    r = two_rank_run[0]["bf16"]
    assert r["compute_dtypes"] == ["torch.bfloat16"]  # layers gathered in bf16 for compute
    assert r["param_dtypes"] == r["grad_dtypes"] == r["optim_dtypes"] == ["torch.float32"]
    assert r["version"] == 1 and r["moved"] > 1e-4
    # sharded bf16 compute (FSDP2 policy) against one process under bf16 autocast, and
    # against full precision: apart by bf16 rounding only
    for other in ("single_figures", "fp32_figures"):
        for k in ("loss", "grad_norm", "entropy"):
            a, b = r["figures"][k], r[other][k]
            assert abs(a - b) <= 0.03 * max(abs(b), 1e-2), (k, other, a, b)


def test_sharded_checkpoint_reloads_and_resumes(two_rank_run):
    result, out = two_rank_run
    ckpt = Path(result["checkpoint"])
    assert {p.name for p in (ckpt / STATE_DIR).iterdir()} == {
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
    }
    assert not list(ckpt.glob("optimizer*.pt"))
    assert result["checkpoint_max_diff"] == 0.0  # HF files hold the gathered full weights
    assert result["resume_max_diff"] < 1e-12  # resumed run continues like the original
    assert result["resume_optimizer_diff"] == 0.0  # optimizer shards back bit for bit
    assert result["fresh_has_optimizer_state"] is False  # saved before any step: none
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 1 and state["format"] == "dcp"
    check_resume_world(ckpt, state, GroupRanks(1, 2, "cpu"))  # same world: accepted
    with pytest.raises(RuntimeError, match="written by 2 learner rank.*nproc_per_node=2"):
        check_resume_world(ckpt, state, GroupRanks(0, 3, "cpu"))
    with pytest.raises(RuntimeError, match="written by 2 learner rank"):
        check_resume_world(ckpt, state, SoloRanks())  # one process cannot resume it
    with pytest.raises(RuntimeError, match="one process"):
        check_resume_world(ckpt, {"step": 1}, GroupRanks(0, 2, "cpu"))
    with pytest.raises(RuntimeError, match="no DCP training state"):
        check_resume_world(ckpt, {"world_size": 2}, GroupRanks(0, 2, "cpu"))


def _start_sharded_learner(stack, redis_url: str, index: int):
    """The learner service as 2 torchrun ranks, registered with the stack like the others."""
    from dapo.cli.stack import Proc
    from dapo.transport.redis_embed import free_port

    port = free_port()
    log_path = stack.run_dir / "logs" / f"learner-{index}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ,
        DAPO_REDIS_URL=redis_url,
        DAPO_RUN_ID=stack.run_id,
        DAPO_WORKER_ID=f"learner-{index}",
        DAPO_HEALTH_PORT=str(port),
        DAPO_PORT=str(port),
        DAPO_THREADS="1",
        DAPO_DEVICE="cpu",
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    popen = subprocess.Popen(
        [*cmd, "-m", "dapo.cli", "service", "learner"],
        env=env,
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    proc = Proc("learner", f"learner-{index}", port, popen, log_path)
    stack.procs.append(proc)
    return proc


def _kill_session(popen: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):  # torchrun's ranks share its session
        os.killpg(popen.pid, signal.SIGKILL)


def test_learner_service_under_torchrun_stops_resumes_and_completes(tmp_path, redis_url):
    """The real services, the learner as 2 torchrun ranks: SIGTERM mid-run writes a sharded
    checkpoint, a new torchrun learner resumes from it, the run completes, every rollout
    worker holds the final weights bit for bit, and every rank exits by itself."""
    from dapo.cli.stack import Stack
    from dapo.runtime.runs import RunStore
    from dapo.weights.registry import stale_or_mismatched_workers
    from tests.e2e_helpers import (
        make_dataset,
        make_model_dir,
        metrics_lines,
        small_spec,
        wait_status,
    )

    runs = tmp_path / "runs"
    spec = small_spec(
        make_model_dir(tmp_path / "model"),
        make_dataset(tmp_path / "train.jsonl"),
        runs,
        trainer={"total_training_steps": 5, "save_freq": 2, "runs_dir": str(runs)},
    )
    store = RunStore(redis.Redis.from_url(redis_url))
    run_id = store.create(spec).run_id
    stack = Stack(redis_url, run_id, runs / run_id, threads=1)
    for kind in ("sampler", "reward", "rollout"):
        stack.start(kind)
    first = _start_sharded_learner(stack, redis_url, 0)
    procs = [first]
    try:
        stack.wait_ready(timeout_s=120)
        store.set_status(run_id, "running")
        deadline = time.monotonic() + 120
        while not (stack.run_dir / "checkpoints" / "step_000002").is_dir():
            assert time.monotonic() < deadline, "no checkpoint at step 2"
            stack.check_alive()
            time.sleep(0.2)
        first.popen.send_signal(signal.SIGTERM)  # graceful: a final sharded checkpoint
        first.popen.wait(timeout=60)
        stack.procs.remove(first)
        procs.append(_start_sharded_learner(stack, redis_url, 1))
        assert wait_status(store, stack, run_id, {"completed", "failed"}) == "completed"
        state = store.state(run_id)
        assert state.step == 5 and state.policy_version == 5
        deadline = time.monotonic() + 30
        while (
            bad := stale_or_mismatched_workers(store.client, run_id, 5)
        ) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert bad == {}
        assert procs[-1].popen.wait(timeout=60) == 0  # every rank stops once the run is done
    finally:
        stack.stop()
        for proc in procs:
            _kill_session(proc.popen)
    assert "resumed from" in procs[-1].log_path.read_text()
    assert sorted({r["batch_id"] for r in metrics_lines(stack.run_dir)}) == [0, 1, 2, 3, 4]
    final = stack.run_dir / "checkpoints" / "step_000005"
    assert (final / STATE_DIR / "__1_0.distcp").is_file()
    AutoModelForCausalLM.from_pretrained(str(final))  # plain HF loading works


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert list(a) == list(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _optimizer_diff(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> float:
    """Largest difference between two optimizers' states (this rank's shards)."""
    from torch.distributed.tensor import DTensor

    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t

    diffs = [0.0]
    for pa, pb in zip(a.param_groups[0]["params"], b.param_groups[0]["params"], strict=True):
        sa, sb = a.state[pa], b.state[pb]
        assert sorted(sa) == sorted(sb)
        diffs += [float((local(sa[k]) - local(sb[k])).abs().max()) for k in sa]
    return max(diffs)


def _exact_run(base, batch, ranks, cfg: dict, checkpointing: bool = False):
    """One training step sharded (optionally with activation checkpointing) and, on rank 0,
    in one process without it: the figures the test compares."""
    from services.learner.distributed import full_params, shard_model
    from services.learner.model_init import checkpoint_layers
    from services.learner.trainer import Trainer
    from tests.services.learner.test_trainer import spec

    model = copy.deepcopy(base)
    if checkpointing:
        checkpoint_layers(model)
    shard_model(model)
    trainer = Trainer(model, spec(**cfg), "cpu", pad_id=0, ranks=ranks)
    figures = trainer.train_batch(batch)
    full = full_params(model)
    if ranks.rank != 0:
        return trainer, full, None
    single = copy.deepcopy(base)
    st = Trainer(single, spec(**cfg), "cpu", pad_id=0)
    single_figures = st.train_batch(batch)
    ref = {n: p.detach() for n, p in single.named_parameters()}
    start = {n: p.detach() for n, p in base.named_parameters()}
    report = {
        "cfg": cfg,
        "checkpointing": checkpointing,
        "max_param_diff": _max_diff(full, ref),
        "moved": _max_diff(full, start),
        "version": trainer.version,
        "single_version": st.version,
        "expected_version": 1,  # one training step, however many mini-batches
        "figures": figures,
        "single_figures": single_figures,
    }
    return trainer, full, report


def _bf16_run(base, batch, ranks) -> dict:
    """bf16 mixed precision, sharded: what is computed in bf16 and what stays float32."""
    from services.learner.distributed import full_params, shard_model
    from services.learner.model_init import mixed_precision
    from services.learner.trainer import Trainer
    from tests.services.learner.test_trainer import spec

    cfg = spec(fsdp_config={"mixed_precision": {"param_dtype": "bf16"}}, **CONFIGS[0])
    base32 = copy.deepcopy(base).float()
    model = shard_model(copy.deepcopy(base32), mixed_precision(cfg))
    seen: set[str] = set()
    q_proj = model.model.layers[0].self_attn.q_proj
    hook = q_proj.register_forward_pre_hook(lambda m, _: seen.add(str(m.weight.dtype)))
    trainer = Trainer(model, cfg, "cpu", pad_id=0, ranks=ranks)
    figures = trainer.train_batch(batch)
    hook.remove()
    start = {n: p.detach() for n, p in base32.named_parameters()}
    moved = _max_diff(full_params(model), start)
    states = trainer.optimizer.state.values()
    report = {
        "compute_dtypes": sorted(seen),
        "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "grad_dtypes": sorted({str(p.grad.dtype) for p in model.parameters()}),
        "optim_dtypes": sorted({str(v.dtype) for s in states for k, v in s.items() if k != "step"}),
        "version": trainer.version,
        "moved": moved,
        "figures": figures,
    }
    if ranks.rank == 0:
        report["single_figures"] = Trainer(copy.deepcopy(base32), cfg, "cpu", 0).train_batch(batch)
        fp32 = Trainer(copy.deepcopy(base32), spec(**CONFIGS[0]), "cpu", 0)
        report["fp32_figures"] = fp32.train_batch(batch)
    return report


def _resume(out: Path, ranks, base, batch, trainer, full) -> dict:
    """Checkpoint ``trainer`` (DCP + HF copy), resume from it, train both on: the figures."""
    from services.learner.distributed import (
        full_params,
        load_model_state,
        load_optimizer_state,
        save_sharded_checkpoint,
        shard_model,
    )
    from services.learner.model_init import build_sharded
    from services.learner.trainer import Trainer
    from tests.services.learner.test_trainer import spec

    model = trainer.model
    ckpt = save_sharded_checkpoint(
        ranks, out / "checkpoints", 1, model, None, trainer.state(), trainer.optimizer
    )
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float64)
    loaded = {n: p.detach().clone() for n, p in hf.named_parameters()}
    resumed_model = build_sharded(model.config, torch.float64, "cpu")  # on meta, then empty
    load_model_state(ckpt, resumed_model)
    resumed = Trainer(resumed_model, spec(**CONFIGS[-1]), "cpu", pad_id=0, ranks=ranks)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert load_optimizer_state(ckpt, resumed_model, resumed.optimizer)
    resumed.load_state(state, None)
    optimizer_diff = _optimizer_diff(trainer.optimizer, resumed.optimizer)
    trainer.train_batch(batch)
    resumed.train_batch(batch)
    after, after_resumed = full_params(model), full_params(resumed_model)
    fresh = Trainer(shard_model(copy.deepcopy(base)), spec(), "cpu", pad_id=0, ranks=ranks)
    fresh_ckpt = save_sharded_checkpoint(
        ranks, out / "fresh", 0, fresh.model, None, fresh.state(), fresh.optimizer
    )
    return {
        "checkpoint": str(ckpt),
        "checkpoint_max_diff": _max_diff(loaded, full),
        "resume_max_diff": _max_diff(after, after_resumed),
        "resume_optimizer_diff": optimizer_diff,
        "fresh_has_optimizer_state": load_optimizer_state(fresh_ckpt, fresh.model, fresh.optimizer),
    }


def _worker(out: Path) -> None:
    """One rank of the 2-rank run (under torchrun)."""
    import torch.distributed as dist

    from services.learner.ranks import init_ranks
    from tests.services.learner.test_trainer import rollout_batch, tiny_model

    torch.set_num_threads(1)
    ranks = init_ranks("cpu")
    base = tiny_model(torch.float64)
    box = [rollout_batch(copy.deepcopy(base).float()) if ranks.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)  # one batch, bit for bit, on both ranks
    batch = box[0]
    result: dict = {"configs": []}
    runs = [(cfg, False) for cfg in CONFIGS] + [(CONFIGS[0], True)]
    for cfg, checkpointing in runs:
        trainer, full, report = _exact_run(base, batch, ranks, cfg, checkpointing)
        if cfg is CONFIGS[-1] and not checkpointing:
            last = (trainer, full)
        result["configs"].append(report)
    result["bf16"] = _bf16_run(base, batch, ranks)
    result.update(_resume(out, ranks, base, batch, *last))
    if ranks.rank == 0:
        (out / "result.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
