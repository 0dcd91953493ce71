"""The run specification: every algorithm knob of a DAPO run, validated.

Names follow verl where verl has one (``data.train_batch_size``,
``rollout.n``, ``actor.clip_ratio_low``, ``algorithm.filter_groups`` ...), so a
verl DAPO recipe maps over field by field. The spec travels to the control API
as JSON and lives in Redis beside the run state; services read the
sub-config they need and nothing else.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from proto.vocab import (
    EngineName,
    FilterMetric,
    ISLevel,
    KLType,
    LossAggMode,
    ModelDType,
    PromptTemplate,
    RewardMode,
    RSLevel,
)

SPEC_VERSION = 1
MAX_TOKENS = 1 << 20
"""Bound of every token length in a spec (a million tokens)."""
MAX_TEXT = 4096
"""Bound of every string in a spec (paths, keys, names)."""

_BOOL = TypeAdapter(bool)


def _check_text(where: str, value: Any) -> None:
    if isinstance(value, str):
        if len(value) > MAX_TEXT:
            raise ValueError(f"{where} is {len(value)} characters long (at most {MAX_TEXT})")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{where} is not valid Unicode (a lone surrogate)") from None
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_text(f"{where}[{i}]", item)


class _Strict(BaseModel):
    """Unknown keys are an error: a typo in a config must not be silently ignored. Every
    number is finite (and each field bounded), every string valid Unicode and bounded: a
    spec is stored as JSON and read by every service, so what cannot round-trip or would
    overflow downstream is refused here, naming the field."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="after")
    def _texts_are_sane(self):
        for name, value in self.__dict__.items():
            _check_text(name, value)
        return self


class ModelConfig(_Strict):
    path: str = Field("default-task", min_length=1)
    """Hugging Face model directory; ``default-task`` is the embedded tiny model."""
    tokenizer_path: str | None = None
    """Tokenizer directory; None means the model directory."""
    dtype: ModelDType = "float32"
    """Parameter dtype the learner keeps its master weights (and optimizer state) in; the
    compute dtype is ``actor.fsdp_config.mixed_precision.param_dtype``."""
    enable_gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations during the learner's backward instead of
    keeping them from the forward (verl's ``actor_rollout_ref.model.
    enable_gradient_checkpointing``, which defaults to true): the activation memory of one
    layer instead of all of them, for about one more forward of compute; same gradients."""


class DataConfig(_Strict):
    train_files: list[str] = Field(default_factory=lambda: ["default-task"])
    """Parquet or JSONL files in the DAPO-Math / verl schema; ``default-task`` is the synthetic set."""
    val_files: list[str] = Field(default_factory=lambda: ["default-task"])
    """Held-out evaluation files, same schema."""
    prompt_key: str = "prompt"
    """Column holding the chat-format prompt."""
    train_batch_size: int = Field(512, ge=1, le=1_000_000)
    """Groups (prompts) per training batch: the dynamic-sampling quota."""
    max_prompt_length: int = Field(2048, ge=1, le=MAX_TOKENS)
    """Prompts longer than this many tokens are rejected when the dataset loads."""
    max_response_length: int = Field(20480, ge=1, le=MAX_TOKENS)
    """Generation budget per sample, in tokens (the EOS token counts)."""
    shuffle: bool = True
    """Shuffle the prompts each epoch."""
    seed: int = Field(0, ge=0, lt=2**32)
    """Seed of the shuffle."""
    prompt_template: PromptTemplate = "none"
    """Wrap each prompt in the DAPO math template (rows that already carry it are left alone)."""
    apply_chat_template: bool = True
    """Render prompts with the tokenizer's chat template when it has one."""


class ValKwargs(_Strict):
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    """Sampling temperature for evaluation."""
    top_p: float = Field(0.7, gt=0.0, le=1.0)
    """Nucleus mass for evaluation (the DAPO eval uses 0.7)."""
    n: int = Field(32, ge=1, le=4096)
    """Samples per problem for avg@n."""


class RolloutConfig(_Strict):
    engine: EngineName = "hf"
    """Inference engine: Hugging Face transformers (portable) or vLLM (GPU)."""
    n: int = Field(16, ge=2, le=4096)
    """G: samples generated per prompt (a group)."""
    temperature: float = Field(1.0, gt=0.0, le=100.0)
    """Sampling temperature during training rollouts."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass during training rollouts."""
    top_k: int = Field(-1, ge=-1, le=1_000_000)
    """Top-k sampling; -1 disables it."""
    dtype: ModelDType = "bfloat16"
    """Compute dtype of the vLLM rollout engine (verl's ``actor_rollout_ref.rollout.dtype``),
    used when the rollout pod's vLLM setting is ``auto``. Independent of ``model.dtype``, the
    learner's master weights: bf16 rollouts of fp32 weights are the usual setup, and the
    mismatch they cause is what ``algorithm.rollout_correction`` measures and corrects."""
    val_kwargs: ValKwargs = Field(default_factory=ValKwargs)
    """Sampling used by evaluation."""

    @model_validator(mode="after")
    def _top_k_on_or_off(self) -> RolloutConfig:
        if self.top_k == 0:
            raise ValueError("rollout.top_k must be -1 (off) or >= 1, got 0")
        return self


class OptimConfig(_Strict):
    lr: float = Field(1e-6, gt=0.0, le=1.0)
    """Peak AdamW learning rate."""
    lr_warmup_steps: int = Field(20, ge=0, le=10_000_000)
    """Training steps (batches, not optimizer steps) of linear warm-up, then constant: every
    mini-batch of training step k (0-based) uses lr * min(1, (k + 1) / lr_warmup_steps)."""
    weight_decay: float = Field(0.1, ge=0.0, le=10.0)
    """AdamW weight decay."""
    betas: tuple[
        Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]
    ] = (0.9, 0.999)
    """AdamW betas, each in [0, 1)."""
    grad_clip: float = Field(1.0, gt=0.0, le=1e6)
    """Global gradient-norm clip."""


class MixedPrecisionConfig(_Strict):
    """Compute dtype against master dtype (verl's ``actor.fsdp_config.mixed_precision``)."""

    param_dtype: Literal["fp32", "float32", "bf16", "bfloat16"] = "fp32"
    """Dtype the parameters are cast to for forward and backward. bf16: bf16 compute while
    the master weights and the optimizer state stay in model.dtype (float32): a sharded
    learner gathers each layer's parameters in bf16 (FSDP2 ``MixedPrecisionPolicy``), one
    process runs under bf16 autocast. fp32: no cast, compute in model.dtype. verl defaults
    to bf16; the default here keeps small CPU runs exact."""
    reduce_dtype: Literal["fp32", "float32"] = "fp32"
    """Dtype gradients are summed over ranks in: float32 only (a bf16 sum over ranks would
    round away the updates of fp32 master weights)."""

    @property
    def compute_dtype(self) -> Literal["bfloat16"] | None:
        """``bfloat16`` when parameters are cast for compute, else None (model.dtype)."""
        return "bfloat16" if self.param_dtype in ("bf16", "bfloat16") else None


class FSDPConfig(_Strict):
    mixed_precision: MixedPrecisionConfig = Field(default_factory=MixedPrecisionConfig)
    """bf16 compute with fp32 master weights, or full precision."""


_REMOVED_ACTOR_FIELDS = {  # name -> what replaces it
    "recompute_old_log_prob": "recompute_old_log_prob: false is now "
    "algorithm.rollout_correction.bypass_mode: true (the rollout log-probs are the PPO "
    "anchor); true is bypass_mode: false, the default",
    "tis_imp_ratio_cap": "tis_imp_ratio_cap: c is now algorithm.rollout_correction."
    "rollout_is: token with algorithm.rollout_correction.rollout_is_threshold: c; null is "
    "rollout_is: null",
}
"""Actor fields that no longer exist; a spec setting one is refused with the replacement."""


class ActorConfig(_Strict):
    ppo_mini_batch_size: int = Field(32, ge=1, le=1_000_000)
    """Groups per optimizer step; a training batch gives train_batch_size / this many steps."""
    ppo_micro_batch_size: int = Field(8, ge=1, le=1_000_000)
    """Samples per forward/backward pass (gradient accumulation unit)."""
    ppo_epochs: int = Field(1, ge=1, le=100)
    """Passes over each training batch."""
    clip_ratio_low: float = Field(0.2, ge=0.0, lt=1.0)
    """eps_low of Clip-Higher: ratio floor 1 - eps_low."""
    clip_ratio_high: float = Field(0.28, ge=0.0, le=100.0)
    """eps_high of Clip-Higher: ratio ceiling 1 + eps_high."""
    clip_ratio_c: float | None = Field(10.0, gt=1.0, le=1e6)
    """Dual-clip bound c for negative advantages; None disables dual clip."""
    loss_agg_mode: LossAggMode = "token-mean"
    """How per-token losses become one scalar (token-mean is DAPO's token-level loss)."""
    log_ratio_clamp: float = Field(20.0, gt=0.0, le=80.0)
    """|log r| is clamped to this before exp, for numeric safety."""
    entropy_coeff: float = Field(0.0, ge=0.0, le=100.0)
    """Weight of the entropy bonus (0 = off, as in DAPO)."""
    use_kl_loss: bool = False
    """Add a KL penalty to a frozen reference policy (off in DAPO)."""
    kl_loss_coef: float = Field(0.0, ge=0.0, le=100.0)
    """Weight of the KL penalty."""
    kl_loss_type: KLType = "k3"
    """KL estimator: k1 = log-ratio, k3 = low-variance (Schulman) estimator."""
    overlong_filter: bool = False
    """Mask truncated samples out of the loss (the paper's overlong filtering ablation)."""
    bf16_autocast: bool = False
    """Run forward/backward under bf16 autocast, the parameters staying in model.dtype (a
    sharded learner then gathers them at full width); ``fsdp_config.mixed_precision.
    param_dtype: bf16`` also casts the gathered parameters."""
    fsdp_config: FSDPConfig = Field(default_factory=FSDPConfig)
    """How the learner's model computes and is sharded (verl's ``actor.fsdp_config``)."""
    optim: OptimConfig = Field(default_factory=OptimConfig)
    """Optimizer settings."""

    @model_validator(mode="before")
    @classmethod
    def _removed_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, replacement in _REMOVED_ACTOR_FIELDS.items():
                if name in data:
                    raise ValueError(f"actor.{name} was removed: {replacement}")
        return data


class FilterGroupsConfig(_Strict):
    enable: bool = True
    """Dynamic sampling: drop groups whose metric is identical across all G samples."""
    metric: FilterMetric = "acc"
    """Per-sample value compared within a group."""
    max_num_gen_batches: int = Field(10, ge=0, le=1_000_000)
    """Generation rounds allowed to fill one batch before a clear error (0 = unlimited)."""


class RolloutCorrectionConfig(_Strict):
    """The off-policy objective: how the learner treats the policy that generated a sample
    (verl's ``algorithm.rollout_correction``, same names and meanings).

    Three policies meet in a step: the behaviour policy (the rollout engine's weights and
    numerics, its log-probs recorded per token), the proximal policy (the learner's weights
    before the step) and the policy being trained. Decoupled mode (the default) recomputes
    the proximal log-probs and anchors PPO's clipped ratio on them; ``rollout_is`` then
    weights each token's surrogate by proximal / behaviour (the decoupled PPO objective of
    AReaL, verl's token_is / seq_is) and ``rollout_rs`` masks the tokens or sequences whose
    ratio lies outside a band, out of the loss and its normaliser. Bypass mode anchors PPO on
    the behaviour log-probs and recomputes nothing: the PPO ratio itself is then the
    importance weight, and its clip the trust region.

    ``rollout_is`` defaults to token in decoupled mode (verl ships null): this system is
    asynchronous by default (``algorithm.max_staleness`` 1), and an objective that ignores
    the behaviour policy is refused with stale samples (see ``RunSpec``). In bypass mode,
    where a weight is refused, it defaults to null.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
    bypass_mode: bool = False
    """False (decoupled): the PPO anchor is the proximal policy, log-probs recomputed by the
    learner before the step. True: the behaviour (rollout) log-probs are the anchor and
    nothing is recomputed; rollout_is, rollout_rs and the veto must then be null."""
    rollout_is: ISLevel | None = "token"
    """Importance weight proximal / behaviour multiplying each token's surrogate: per token,
    or the product over the sequence; safety-bounded to [exp(-20), exp(20)], truncated at
    rollout_is_threshold and detached. None: no weight. Default: token, or null when
    bypass_mode is true."""
    rollout_is_threshold: float = Field(2.0, gt=0.0, le=1e6)
    """Truncation: weights above it are set to it."""
    rollout_is_batch_normalize: bool = False
    """Divide the truncated weights by their mean over the batch (over tokens for token
    weights, over sequences for sequence weights), so they average 1."""
    rollout_rs: RSLevel | None = None
    """Rejection: mask out of the loss and its normaliser each token (token), or each whole
    sequence (sequence: product of ratios; geometric: their geometric mean), whose ratio lies
    outside [rollout_rs_threshold_lower, rollout_rs_threshold]. None: no rejection."""
    rollout_rs_threshold: float | None = Field(None, gt=0.0, le=1e6)
    """Upper bound of the kept ratios; None means rollout_is_threshold."""
    rollout_rs_threshold_lower: float | None = Field(None, gt=0.0, le=1e6)
    """Lower bound of the kept ratios; None means 1 / the upper bound."""
    rollout_token_veto_threshold: float | None = Field(None, gt=0.0, le=1.0)
    """A sequence with any token whose ratio proximal / behaviour is below this is masked
    entirely (e.g. 1e-4); None disables the veto."""
    allow_uncorrected_staleness: bool = False
    """Accept algorithm.max_staleness > 0 with an objective that ignores the behaviour policy
    (its gradient is then biased). For ablations that measure what the correction buys."""

    @model_validator(mode="before")
    @classmethod
    def _mode_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and "rollout_is" not in data:
            try:
                bypass = _BOOL.validate_python(data.get("bypass_mode", False))
            except ValidationError:
                return data  # reported by the field's own validation
            if bypass:
                return {**data, "rollout_is": None}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> RolloutCorrectionConfig:
        if self.bypass_mode:
            used = [
                f"{name}: {value}"
                for name, value in (
                    ("rollout_is", self.rollout_is),
                    ("rollout_rs", self.rollout_rs),
                    ("rollout_token_veto_threshold", self.rollout_token_veto_threshold),
                )
                if value is not None
            ]
            if used:
                raise ValueError(
                    f"bypass_mode: true with {', '.join(used)}: in bypass mode the rollout "
                    "log-probs are the PPO anchor and no proximal log-probs are recomputed, so "
                    "there is no proximal / behaviour ratio to weight or reject by (the PPO "
                    "ratio already is the importance weight); set them to null, or use "
                    "bypass_mode: false (decoupled)"
                )
        if self.rollout_rs is not None and self.rs_threshold_lower > self.rs_threshold:
            raise ValueError(
                f"rollout_rs_threshold_lower ({self.rs_threshold_lower}) exceeds the upper "
                f"bound rollout_rs_threshold ({self.rs_threshold}): no ratio would be kept"
            )
        return self

    @property
    def rs_threshold(self) -> float:
        """The upper rejection bound in effect."""
        return (
            self.rollout_is_threshold
            if self.rollout_rs_threshold is None
            else self.rollout_rs_threshold
        )

    @property
    def rs_threshold_lower(self) -> float:
        """The lower rejection bound in effect."""
        if self.rollout_rs_threshold_lower is None:
            return 1.0 / self.rs_threshold
        return self.rollout_rs_threshold_lower

    @property
    def ignores_behavior_policy(self) -> bool:
        """Decoupled with neither weight nor rejection: the recorded behaviour log-probs do
        not enter the loss (the veto alone corrects nothing)."""
        return not self.bypass_mode and self.rollout_is is None and self.rollout_rs is None

    @property
    def uses_behavior_log_probs(self) -> bool:
        """Whether the loss reads the recorded behaviour log-probs (so they must be exact)."""
        return not self.ignores_behavior_policy or self.rollout_token_veto_threshold is not None


class AlgorithmConfig(_Strict):
    adv_estimator: Literal["grpo"] = "grpo"
    """Group-relative advantage."""
    norm_adv_by_std_in_grpo: bool = True
    """Divide by the group's unbiased std (False = Dr. GRPO)."""
    filter_groups: FilterGroupsConfig = Field(default_factory=FilterGroupsConfig)
    """Dynamic sampling."""
    max_staleness: int = Field(1, ge=0, le=1000)
    """Largest lag allowed, in policy versions (one per training step that changed the
    weights): a token generated by version v and trained at learner version V has lag
    V - v. The sampler drops groups older than this, and the learner masks out any sample
    with a token past it (0 = on-policy, synchronous)."""
    rollout_correction: RolloutCorrectionConfig = Field(default_factory=RolloutCorrectionConfig)
    """The off-policy objective (behaviour vs proximal policy)."""


class OverlongBufferConfig(_Strict):
    enable: bool = True
    """Soft overlong punishment on/off."""
    len: int = Field(4096, ge=1, le=MAX_TOKENS)
    """Lcache: length of the punishment interval before max_response_length."""
    penalty_factor: float = Field(1.0, ge=0.0, le=1e6)
    """Penalty at and beyond max_response_length."""


class RewardConfig(_Strict):
    mode: RewardMode = "dapo"
    """Verifier: official DAPO-compatible, strict \\boxed{}, or symbolic Math-Verify."""
    timeout_s: float = Field(2.0, gt=0.0, le=3600.0)
    """Upper bound on one verification; a timeout scores -1."""
    overlong_buffer: OverlongBufferConfig = Field(default_factory=OverlongBufferConfig)
    """Soft overlong punishment."""


class TrainerConfig(_Strict):
    total_training_steps: int = Field(100, ge=1, le=100_000_000)
    """Training batches to consume before the run completes."""
    save_freq: int = Field(20, ge=0, le=100_000_000)
    """Write a checkpoint every N training batches (0 = only at the end)."""
    test_freq: int = Field(0, ge=0, le=100_000_000)
    """Evaluate every N training batches (0 = only before and after)."""
    max_in_flight: int = Field(0, ge=0, le=100_000_000)
    """Prompts dispatched but not yet scored (0 = 2 * train_batch_size)."""
    runs_dir: str = "runs"
    """Folder that holds one sub-folder per run."""
    logger: list[Literal["console", "tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["console"], max_length=4
    )
    """Where per-step figures, the run spec and held-out evaluations go, besides
    metrics.jsonl (verl's ``trainer.logger``); each backend but console needs the
    ``tracking`` extra. A single name is taken as a list of one; no name twice."""
    project_name: str = Field("dapo", pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
    """Project (W&B) or experiment (MLflow) the run is filed under."""
    experiment_name: str | None = Field(None, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
    """The run's name in the trackers; None: the run id."""

    @field_validator("logger", mode="before")
    @classmethod
    def _one_logger_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("logger")
    @classmethod
    def _no_logger_twice(cls, value: list[str]) -> list[str]:
        twice = sorted({name for name in value if value.count(name) > 1})
        if twice:
            raise ValueError(f"logger names {', '.join(twice)} more than once")
        return value


class RunSpec(_Strict):
    spec_version: Literal[1] = SPEC_VERSION
    """Version of this schema."""
    name: str = Field("dapo", pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
    """Human name of the run; part of the run id."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    actor: ActorConfig = Field(default_factory=ActorConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)

    @model_validator(mode="after")
    def _cross_field(self) -> RunSpec:
        if self.data.train_batch_size % self.actor.ppo_mini_batch_size:
            raise ValueError(
                "actor.ppo_mini_batch_size must divide data.train_batch_size "
                f"({self.actor.ppo_mini_batch_size} does not divide {self.data.train_batch_size})"
            )
        alg = self.algorithm
        rc = alg.rollout_correction
        if (
            alg.max_staleness > 0
            and rc.ignores_behavior_policy
            and not (rc.allow_uncorrected_staleness)
        ):
            raise ValueError(
                f"algorithm.max_staleness is {alg.max_staleness}: samples may come from an "
                "older policy, but algorithm.rollout_correction ignores the policy that "
                "generated them (decoupled, rollout_is and rollout_rs null); set "
                "algorithm.rollout_correction.rollout_is: token (decoupled PPO with truncated "
                "importance weights), or rollout_is: sequence, or rollout_rs: token | "
                "sequence | geometric (rejection), or bypass_mode: true (the rollout "
                "log-probs as the PPO anchor), or algorithm.max_staleness: 0"
            )
        ob = self.reward.overlong_buffer
        if ob.enable and ob.len > self.data.max_response_length:
            raise ValueError(
                f"reward.overlong_buffer.len ({ob.len}) exceeds data.max_response_length "
                f"({self.data.max_response_length})"
            )
        return self

    @property
    def in_flight_limit(self) -> int:
        return self.trainer.max_in_flight or 2 * self.data.train_batch_size
