"""Where the time of the default run goes: per service, and per trained sample.

``DAPO_BENCH_PROFILE_REPS`` runs (3) of ``cpu-small`` for ``DAPO_BENCH_PROFILE_STEPS``
steps (40), the real local stack (``dapo.cli.local.LocalRun``, as ``make run``). While each
runs, every service's /metrics is read once a second; the profile is the difference between
the first reading after step ``WARMUP_STEPS`` and the last complete one, so model loading
and the first steps are left out.

Per service ``<s>`` (sampler, rollout, reward, learner), shares of its loop's wall time
(``dapo_service_seconds_total``, ``dapo.runtime.profile``): ``profile.<s>.work`` (handling
what was read), ``.wait`` (blocked reading the bus), ``.bus`` (other bus calls), ``.idle``
(paused); and ``.cpu``, the CPU cores it kept busy (``process_cpu_seconds_total`` over wall
time). Per trained sample, in milliseconds of the service's own time
(``profile.ms_per_sample.<x>``): ``generation`` (the rollout engine's generate calls,
weight loads between decode steps included), ``weight_load`` (the rollout's receiving and
loading of weights), ``scoring`` (decoding and verifying), ``bus`` (all services' bus calls
other than blocking reads), ``learner_train`` (the learner's forward, backward and
optimizer step on a batch; the metrics do not split them), ``weight_sync`` (the learner's
broadcast) and ``wall`` (window wall time over trained samples: the pipeline's pace). A
sample generated but filtered out costs generation and scoring time too, so those are per
*trained* sample. ``learner_train`` is then split by ``step_shares``, measured on the same
``Trainer`` in this process (``profile.learner_share.<part>``, and
``profile.ms_per_sample.learner_<part>``: ``logp``, ``forward``, ``backward``,
``optimizer``, ``other``). Each figure is the median of the repetitions, with
``_min``/``_max`` for the per-sample ones and ``profile.samples_per_s``; the load average
before and after is ``profile.load_1m_before``/``_after``. Every repetition's figures are
kept in ``.bench/profile.json``.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM

from dapo.cli.local import LocalRun
from dapo.data.dataset import load_default_or_files
from dapo.data.models import load_tokenizer, resolve_model_dir
from dapo.data.prompts import PromptSource
from dapo.runtime.config import load_run_spec
from dapo.runtime.profile import PHASES
from proto.messages import ScoredGroup, ScoredSample, TrainingBatch
from proto.runspec import RunSpec
from services.learner.trainer import Trainer

STEPS = int(os.environ.get("DAPO_BENCH_PROFILE_STEPS", "40"))
REPS = int(os.environ.get("DAPO_BENCH_PROFILE_REPS", "3"))
WARMUP_STEPS = 5
"""Steps left out of the profile: the pipeline filling up."""
SERVICES = ("sampler", "rollout", "reward", "learner")
OUT = Path(".bench/profile.json")

Reading = dict[str, dict[tuple[str, tuple], float]]
"""worker kind -> (sample name, sorted label pairs) -> value, at one moment."""


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


class Scraper(threading.Thread):
    """Reads every service's /metrics each second; keeps the first complete reading at or
    after ``WARMUP_STEPS`` and the latest complete one."""

    def __init__(self, ports: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.ports, self.stop = ports, threading.Event()
        self.first: tuple[float, Reading] | None = None
        self.last: tuple[float, Reading] | None = None

    def run(self) -> None:
        while not self.stop.wait(1.0):
            try:
                at = time.perf_counter()
                reading = {kind: scrape(port) for kind, port in self.ports.items()}
            except OSError:  # a service already gone at the end of the run
                continue
            if learner_step(reading) < WARMUP_STEPS:
                continue
            if self.first is None:
                self.first = (at, reading)
            self.last = (at, reading)


def learner_step(reading: Reading) -> float:
    return reading["learner"].get(("dapo_learner_step", ()), 0.0)


class ProfiledRun(LocalRun):
    """``LocalRun`` that starts a ``Scraper`` on the services once they are ready."""

    scraper: Scraper | None = None

    def _start(self, services) -> None:
        super()._start(services)
        ports = {p.kind: p.port for p in services.procs if p.kind in SERVICES}
        self.scraper = Scraper(ports)
        self.scraper.start()


def delta(a: Reading, b: Reading, kind: str, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return b[kind].get(key, 0.0) - a[kind].get(key, 0.0)


def profile(a: Reading, b: Reading, wall_s: float, per_step: int) -> dict[str, float]:
    """The figures of one run from two readings ``wall_s`` seconds apart."""
    samples = (learner_step(b) - learner_step(a)) * per_step
    if samples <= 0:
        raise RuntimeError(f"no step trained between the readings ({wall_s:.1f} s apart)")
    out: dict[str, float] = {"profile.samples_per_s": samples / wall_s}
    bus = 0.0
    for kind in SERVICES:
        phases = {
            p: delta(a, b, kind, "dapo_service_seconds_total", component=kind, phase=p)
            for p in PHASES
        }
        loop_s = sum(phases.values()) or 1.0
        for p, s in phases.items():
            out[f"profile.{kind}.{p}"] = s / loop_s
        out[f"profile.{kind}.cpu"] = delta(a, b, kind, "process_cpu_seconds_total") / wall_s
        bus += phases["bus"]
    ms = 1000.0 / samples
    per_sample = {
        "generation": delta(a, b, "rollout", "dapo_rollout_generation_seconds_sum"),
        "weight_load": delta(a, b, "rollout", "dapo_rollout_weight_load_seconds_sum"),
        "scoring": delta(a, b, "reward", "dapo_reward_group_seconds_sum"),
        "bus": bus,
        "learner_train": delta(a, b, "learner", "dapo_learner_step_seconds_sum"),
        "weight_sync": delta(a, b, "learner", "dapo_weight_sync_seconds_sum", phase="total"),
        "wall": wall_s,
    }
    out.update({f"profile.ms_per_sample.{k}": v * ms for k, v in per_sample.items()})
    return out


class TimedTrainer(Trainer):
    """The learner's ``Trainer``, timing the parts of a step (seconds, summed)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.parts: dict[str, float] = dict.fromkeys(("logp", "forward", "micro", "mini"), 0.0)

    def _timed(self, part: str, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.parts[part] += time.perf_counter() - t0

    def _fixed_logp(self, model, packed):
        return self._timed("logp", super()._fixed_logp, model, packed)

    def forward_logp(self, model, mb, with_entropy: bool = False):
        if not torch.is_grad_enabled():  # the proximal forward, counted in "logp"
            return super().forward_logp(model, mb, with_entropy)
        return self._timed("forward", super().forward_logp, model, mb, with_entropy)

    def _micro_batch(self, *args):
        return self._timed("micro", super()._micro_batch, *args)

    def _mini_batch(self, *args):
        return self._timed("mini", super()._mini_batch, *args)


def run_shaped_batch(spec: RunSpec, tokenizer, response_len: int) -> TrainingBatch:
    """A batch of the run's shape: ``train_batch_size`` real prompts, ``n`` answers of
    ``response_len`` made-up tokens each, half of every group correct (so no advantage is 0)."""
    source = PromptSource(load_default_or_files(["default-task"], None), tokenizer, spec.data)
    rng = np.random.default_rng(0)
    n, groups = spec.rollout.n, []
    for g in range(spec.data.train_batch_size):
        item = source.item(g)
        samples = [
            ScoredSample(
                response_ids=rng.integers(3, 200, response_len).tolist(),
                logprobs=[-0.5] * response_len,
                finish_reason="stop",
                versions=[0],
                version_starts=[0],
                score=1.0 if i % 2 else -1.0,
                acc=bool(i % 2),
                overlong_penalty=0.0,
                length=response_len,
                truncated=False,
            )
            for i in range(n)
        ]
        groups.append(
            ScoredGroup(
                run_id="profile",
                group_id=f"g{g}",
                prompt_id=item.prompt_id,
                prompt_ids=item.token_ids,
                ground_truth=item.ground_truth,
                n=n,
                policy_version=0,
                worker_id="profile",
                engine="hf",
                gen_seconds=0.0,
                samples=samples,
            )
        )
    return TrainingBatch(run_id="profile", batch_id=0, groups=groups)


def step_shares(spec: RunSpec, response_len: int, steps: int = 5) -> dict[str, float]:
    """Shares of a training step on the default model and a batch of the run's shape, on
    the one thread LocalRun gives a service on 2 cores: the proximal log-prob forward (no
    gradient), the forward, the loss and backward, clipping and the optimizer step, and the
    rest (packing, correction, figures). Median of ``steps`` steps after a warm-up one."""
    tokenizer = load_tokenizer(spec.model, None)
    model = AutoModelForCausalLM.from_pretrained(
        str(resolve_model_dir(spec.model, None)), dtype=torch.float32
    )
    batch = run_shaped_batch(spec, tokenizer, response_len)
    trainer = TimedTrainer(model, spec, "cpu", pad_id=tokenizer.pad_token_id or 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))  # as LocalRun gives a service
    rows = []
    try:
        for step in range(steps + 1):
            trainer.parts = dict.fromkeys(trainer.parts, 0.0)
            trainer.version = 0  # the batch is on-policy every time, as most are in the run
            t0 = time.perf_counter()
            trainer.train_batch(batch)
            total, p = time.perf_counter() - t0, trainer.parts
            if step:  # the first step warms up
                rows.append(
                    {
                        "logp": p["logp"] / total,
                        "forward": p["forward"] / total,
                        "backward": (p["micro"] - p["forward"]) / total,
                        "optimizer": (p["mini"] - p["micro"]) / total,
                        "other": (total - p["logp"] - p["mini"]) / total,
                    }
                )
    finally:
        torch.set_num_threads(threads)
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def response_length(runs_dir: Path) -> int:
    """Median response length (tokens) of the newest run under ``runs_dir``."""
    run_dir = max(runs_dir.iterdir(), key=lambda p: p.stat().st_mtime)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return max(1, round(statistics.median(r["response_length_mean"] for r in rows)))


def one_run(spec: RunSpec) -> dict[str, float]:
    run = ProfiledRun(spec, skip_eval=True)
    try:
        assert run.main() == 0, "the profiled run failed"
    finally:
        if run.scraper is not None:
            run.scraper.stop.set()
            run.scraper.join()
    scraper = run.scraper
    if scraper is None or scraper.first is None or scraper.last is None:
        raise RuntimeError("no complete reading of the services' /metrics after warm-up")
    (t0, a), (t1, b) = scraper.first, scraper.last
    return profile(a, b, t1 - t0, spec.data.train_batch_size * spec.rollout.n)


def print_table(figures: dict[str, float]) -> None:
    print(f"   {'service':<10}" + "".join(f"{p:>8}" for p in (*PHASES, "cpu")))
    for kind in SERVICES:
        cells = "".join(f"{figures[f'profile.{kind}.{p}']:>8.2f}" for p in (*PHASES, "cpu"))
        print(f"   {kind:<10}{cells}")
    print("   per trained sample (ms):")
    for k, v in figures.items():
        if k.startswith("profile.ms_per_sample."):
            print(f"     {k.removeprefix('profile.ms_per_sample.'):<20}{v:>8.3f}")


def run() -> dict[str, float]:
    runs_dir = Path(".bench/profile/runs")
    overrides = [f"trainer.total_training_steps={STEPS}", f"trainer.save_freq={STEPS}"]
    spec = load_run_spec("cpu-small", [*overrides, f"trainer.runs_dir={runs_dir}"])
    load_before = os.getloadavg()[0]  # other users of the machine, before the runs
    reps = [one_run(spec) for _ in range(REPS)]
    median = {k: statistics.median(r[k] for r in reps) for k in reps[0]}
    shares = step_shares(spec, response_length(runs_dir))
    train_ms = median["profile.ms_per_sample.learner_train"]
    for part, share in shares.items():  # the service's measured step time, split
        median[f"profile.learner_share.{part}"] = share
        median[f"profile.ms_per_sample.learner_{part}"] = train_ms * share
    median["profile.load_1m_before"] = load_before
    median["profile.load_1m_after"] = os.getloadavg()[0]
    out = dict(median)
    for k in reps[0]:
        if k.startswith(("profile.ms_per_sample.", "profile.samples_per_s")):
            out[f"{k}_min"] = min(r[k] for r in reps)
            out[f"{k}_max"] = max(r[k] for r in reps)
    OUT.parent.mkdir(exist_ok=True)
    record = {"steps": STEPS, "warmup_steps": WARMUP_STEPS, "figures": out, "reps": reps}
    OUT.write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"   median of {len(reps)} runs of {STEPS} steps (load average {load_before:.2f} "
        f"before, {median['profile.load_1m_after']:.2f} after); shares of each loop's time:"
    )
    print_table(median)
    return out
