"""One training run on this machine, start to finish (what ``make run`` does)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic_settings import BaseSettings, SettingsConfigDict
from tqdm import tqdm

from dapo.cli.evaluate import EvalSpec, evaluate_model_dir
from dapo.cli.plots import EVALS_FILE, plot_run, read_metrics
from dapo.cli.stack import SERVICE_ORDER, Stack, print_table
from dapo.data.dataset import DatasetError, load_default_or_files
from dapo.data.models import load_tokenizer, pick_device, resolve_model_dir
from dapo.data.prompts import PromptSource
from dapo.runtime.config import ConfigError, load_run_spec
from dapo.runtime.runs import RunStore
from dapo.tracking import Trackers, TrackerUnavailable, TrackingRun, check_available, open_trackers
from dapo.transport.redis_bus import connect
from dapo.transport.redis_embed import EmbeddedRedis
from proto.lifecycle import FINAL
from proto.messages import SamplingParams
from proto.runspec import RunSpec


class LocalSettings(BaseSettings):
    """Where ``dapo up`` finds Redis and the default task (DAPO_* environment variables)."""

    model_config = SettingsConfigDict(env_prefix="DAPO_", extra="ignore", frozen=True)
    redis_url: str = ""
    """Redis to run in (DAPO_REDIS_URL); empty: start an embedded one."""
    cache_dir: str = ""
    """Where the default task is built (DAPO_CACHE_DIR); empty: the repository's .cache/."""


@dataclass
class LocalRun:
    spec: RunSpec
    rollout_workers: int = 1
    skip_eval: bool = False
    eval_n: int | None = None
    settings: LocalSettings = field(default_factory=LocalSettings)
    train_start: float = field(default=0.0, init=False)
    """When training started (epoch seconds): the origin of the curves' wall-time axis."""

    @property
    def cache_dir(self) -> str | None:
        return self.settings.cache_dir or None

    def eval_spec(self) -> EvalSpec:
        vk = self.spec.rollout.val_kwargs
        sampling = SamplingParams(
            n=self.eval_n or vk.n,
            temperature=vk.temperature,
            top_p=vk.top_p,
            max_new_tokens=self.spec.data.max_response_length,
            seed=self.spec.data.seed,
        )
        return EvalSpec(sampling, mode=self.spec.reward.mode)

    def evaluate(self, model_dir: Path, desc: str) -> dict[str, float]:
        d = self.spec.data
        return evaluate_model_dir(
            model_dir,
            self.val_rows,
            self.eval_spec(),
            device=pick_device("auto"),
            template=d.prompt_template,
            apply_chat_template=d.apply_chat_template,
            desc=desc,
        )

    def prepare(self) -> Path:
        """Everything that can reject the run, before any process starts."""
        check_trackers(self.spec)
        warn_test_freq(self.spec, self.test_freq)
        model_dir = resolve_model_dir(self.spec.model, self.cache_dir, progress=True)
        key = self.spec.data.prompt_key
        # every row is validated here, so a bad one stops the run before anything starts
        train = load_default_or_files(self.spec.data.train_files, self.cache_dir, prompt_key=key)
        PromptSource(
            train, load_tokenizer(self.spec.model, self.cache_dir), self.spec.data
        ).check_all()
        self.val_rows = load_default_or_files(
            self.spec.data.val_files, self.cache_dir, split="val", prompt_key=key
        )
        return model_dir

    def main(self) -> int:
        # Ctrl-C (and a supervisor's SIGTERM) become one graceful path, even where the
        # shell started us with SIGINT ignored: stop the run, then every process we started.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.default_int_handler)
        t_start = time.time()
        print(f"preparing (model, data) for run spec '{self.spec.name}' ...", flush=True)
        model_dir = self.prepare()
        url = self.settings.redis_url
        with contextlib.ExitStack() as stack:
            if not url:
                url = stack.enter_context(EmbeddedRedis()).url
                print(f"embedded Redis at {url}")
            client = connect(url)
            store = RunStore(client)
            run_id = store.create(self.spec).run_id
            run_dir = Path(self.spec.trainer.runs_dir) / run_id
            write_config(run_dir, self.spec)
            print(f"run {run_id} -> {run_dir}")
            before = {} if self.skip_eval else self.evaluate(model_dir, "eval before")
            k = self.eval_spec().sampling.n
            if before:
                print(f"held-out acc/mean@{k} before training: {before[f'acc/mean@{k}']:.3f}")
                self.record_evals(run_id, run_dir, [EvalPoint(0, "before", None, before)])
            services = Stack(url, run_id, run_dir, threads=self._threads())
            stack.callback(services.stop)
            try:
                self._start(services)
                store.act(run_id, "start")
                self.train_start = t_train = time.time()
                self._follow(store, services, run_id, run_dir)
                train_s = time.time() - t_train
            except KeyboardInterrupt:
                print("\nstopping: the learner writes a final checkpoint ...", flush=True)
                with contextlib.suppress(Exception):
                    store.act(run_id, "stop")
                    self._wait_final(store, run_id, 60)
                return 130
            services.stop()
            return self._finish(client, run_id, run_dir, before, train_s, t_start)

    def _threads(self) -> int:
        return max(1, (os.cpu_count() or 2) // 2)

    @property
    def test_freq(self) -> int:
        """Evaluate the checkpoints of every test_freq-th step after the run (0: none)."""
        return 0 if self.skip_eval else self.spec.trainer.test_freq

    def _start(self, services: Stack) -> None:
        # periodic evaluation reads checkpoints after the run: the learner keeps them all
        learner_env = {"DAPO_KEEP_CHECKPOINTS": "0"} if self.test_freq else None
        for kind in SERVICE_ORDER:
            for i in range(self.rollout_workers if kind == "rollout" else 1):
                services.start(kind, i, extra_env=learner_env if kind == "learner" else None)
        token = secrets.token_urlsafe(24)
        token_file = services.run_dir / "api_token"
        token_file.touch(mode=0o600)
        token_file.write_text(token + "\n")
        api = services.start("api", extra_env={"DAPO_API_TOKEN": token})
        services.wait_ready()
        print_table(services.procs)
        print(f"control API: http://127.0.0.1:{api.port}  (bearer token in {token_file})")

    def _follow(self, store: RunStore, services: Stack, run_id: str, run_dir: Path) -> None:
        total = self.spec.trainer.total_training_steps
        bar = tqdm(total=total, desc="training", unit="step")
        seen = 0

        def restarted(proc) -> None:
            store.record_restart(run_id, proc.worker_id)

        while True:
            state = store.state(run_id)
            if state.status not in FINAL:  # a service that died mid-run comes back
                services.supervise(restarted)
            rows = read_metrics(run_dir)
            if len(rows) > seen:
                bar.update(len(rows) - seen)
                seen = len(rows)
                r = rows[-1]
                bar.set_postfix(
                    reward=f"{r['reward_mean']:.2f}",
                    acc=f"{r['acc_mean']:.2f}",
                    kept=f"{r['kept_ratio']:.2f}",
                    ent=f"{r.get('entropy', 0):.2f}",
                    lag=f"{r['version_lag']:.1f}",
                    v=int(r["version"]),
                )
            if state.status == "failed":
                bar.close()
                raise RuntimeError(f"run failed: {state.error}")
            if state.status in ("completed", "stopped"):
                bar.close()
                return
            time.sleep(0.5)

    def _wait_final(self, store: RunStore, run_id: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if store.state(run_id).status in FINAL:
                return
            time.sleep(0.5)

    def record_evals(self, run_id: str, run_dir: Path, points: list[EvalPoint]) -> None:
        """Each held-out evaluation: a line of evals.jsonl (what ``dapo plot`` draws) and a
        point of the trackers' ``val/...`` series at its training step."""
        if not points:
            return
        with (run_dir / EVALS_FILE).open("a") as f:
            for p in points:
                f.write(json.dumps(p.record()) + "\n")
        run = TrackingRun.of(self.spec, run_id, run_dir)
        with open_trackers(self.spec.trainer.logger, run) as trackers:
            for p in points:
                trackers.log_eval(p.figures, p.step)
            report_failures(trackers)

    def evaluate_after(self, run_dir: Path, final_dir: Path | None) -> list[EvalPoint]:
        """The periodic evaluations (trainer.test_freq) of the checkpoints the run kept, then
        the final checkpoint's ("after")."""
        if self.skip_eval or final_dir is None:
            return []
        final_step = checkpoint_step(final_dir)
        points = []
        for step, ckpt in periodic_checkpoints(run_dir, self.test_freq, final_step):
            points.append(EvalPoint(step, "periodic", ckpt, self.evaluate(ckpt, f"eval {step}")))
        after = self.evaluate(final_dir, "eval after")
        return [*points, EvalPoint(final_step, "after", final_dir, after)]

    def _finish(self, client, run_id, run_dir, before, train_s, t_start) -> int:
        final = RunStore(client).state(run_id).final_checkpoint
        final_dir = Path(final) if final else None
        k = self.eval_spec().sampling.n
        points = self.evaluate_after(run_dir, final_dir)
        self.record_evals(run_id, run_dir, points)
        after = points[-1].figures if points else {}
        rows = read_metrics(run_dir)
        samples = len(rows) * self.spec.data.train_batch_size * self.spec.rollout.n
        summary = {
            "run_id": run_id,
            "steps": len(rows),
            "wall_s": round(time.time() - t_start, 1),
            "train_wall_s": round(train_s, 1),
            "trained_samples_per_s": round(samples / train_s, 2) if train_s else None,
            "train_start": round(self.train_start, 3),
            "final_checkpoint": str(final_dir) if final_dir else None,
            "eval_k": k,
        }
        if before and after:
            summary.update(
                acc_before=before[f"acc/mean@{k}"],
                acc_after=after[f"acc/mean@{k}"],
                eval_before=before,
                eval_after=after,
            )
        write_summary(run_dir, summary)
        if rows:
            print(f"curves: {plot_run(run_dir)}")
        print(
            json.dumps({k2: v for k2, v in summary.items() if not k2.startswith("eval_")}, indent=2)
        )
        if before and after:
            print(
                f"held-out acc/mean@{k}: {summary['acc_before']:.3f} -> {summary['acc_after']:.3f}",
                file=sys.stderr,
            )
        return 0


def up(
    config: str | None,
    overrides: list[str],
    *,
    rollout_workers: int = 1,
    skip_eval: bool = False,
    eval_n: int | None = None,
) -> int:
    try:
        spec = load_run_spec(config, overrides)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        return LocalRun(
            spec, rollout_workers=rollout_workers, skip_eval=skip_eval, eval_n=eval_n
        ).main()
    except ConfigError as exc:  # found while preparing (e.g. a tracker's package missing)
        print(exc, file=sys.stderr)
        return 2
    except (DatasetError, FileNotFoundError) as exc:  # bad input: say what and where, no trace
        print(f"error: {exc}", file=sys.stderr)
        return 2


def write_config(run_dir: Path, spec) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(
        yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    )


def write_summary(run_dir: Path, summary: dict) -> None:
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


@dataclass(frozen=True)
class EvalPoint:
    step: int
    """Training steps behind the evaluated weights (0: the initial model)."""
    kind: str
    """before, periodic or after."""
    checkpoint: Path | None
    figures: dict[str, float]

    def record(self) -> dict:
        ckpt = str(self.checkpoint) if self.checkpoint else None
        return {"step": self.step, "kind": self.kind, "checkpoint": ckpt, **self.figures}


def check_trackers(spec: RunSpec) -> None:
    """A logger whose package is missing stops the run before anything starts."""
    try:
        check_available(spec.trainer.logger)
    except TrackerUnavailable as exc:
        raise ConfigError(str(exc)) from None


def warn_test_freq(spec: RunSpec, test_freq: int) -> None:
    """Periodic evaluation reads the checkpoints saved every save_freq steps: say so when
    that makes it sparser than asked."""
    save = spec.trainer.save_freq
    if test_freq and (save == 0 or math.lcm(test_freq, save) != test_freq):
        every = f"every {math.lcm(test_freq, save)} steps" if save else "only at the end"
        print(
            f"note: trainer.test_freq is {test_freq} but checkpoints are saved every "
            f"trainer.save_freq={save} steps: held-out evaluation runs {every}",
            file=sys.stderr,
        )


def report_failures(trackers: Trackers) -> None:
    for name, count in trackers.failures.items():
        print(
            f"warning: tracker {name} failed {count} time(s); see the error above", file=sys.stderr
        )


def checkpoint_step(path: Path) -> int:
    """``.../step_000040`` -> 40."""
    match = re.fullmatch(r"step_(\d+)", Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a step_NNNNNN checkpoint")
    return int(match.group(1))


def periodic_checkpoints(run_dir: Path, test_freq: int, final_step: int) -> list[tuple[int, Path]]:
    """The saved checkpoints at multiples of ``test_freq`` before the final one, by step.
    Checkpoints are written every ``save_freq`` steps, so only the steps that are multiples
    of both are there to evaluate."""
    if test_freq <= 0:
        return []
    found = []
    for ckpt in sorted((Path(run_dir) / "checkpoints").glob("step_*")):
        with contextlib.suppress(ValueError):
            step = checkpoint_step(ckpt)
            if step % test_freq == 0 and 0 < step < final_step:
                found.append((step, ckpt))
    return sorted(found)
