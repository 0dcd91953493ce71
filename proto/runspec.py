"""The run specification: every algorithm knob of a DAPO run, validated.

Names follow verl where verl has one (``data.train_batch_size``,
``rollout.n``, ``actor.clip_ratio_low``, ``algorithm.filter_groups`` ...), so a
verl DAPO recipe maps over field by field. The spec travels to the control API
as JSON and lives in Redis beside the run state; services read the
sub-config they need and nothing else.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from proto.vocab import (
    EngineName,
    FilterMetric,
    KLType,
    LossAggMode,
    ModelDType,
    PromptTemplate,
    RewardMode,
)

SPEC_VERSION = 1


class _Strict(BaseModel):
    """Unknown keys are an error: a typo in a config must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    path: str = Field("default-task", min_length=1)
    """Hugging Face model directory; ``default-task`` is the embedded tiny model."""
    tokenizer_path: str | None = None
    """Tokenizer directory; None means the model directory."""
    dtype: ModelDType = "float32"
    """Parameter dtype the learner keeps its master weights in."""


class DataConfig(_Strict):
    train_files: list[str] = Field(default_factory=lambda: ["default-task"])
    """Parquet or JSONL files in the DAPO-Math / verl schema; ``default-task`` is the synthetic set."""
    val_files: list[str] = Field(default_factory=lambda: ["default-task"])
    """Held-out evaluation files, same schema."""
    prompt_key: str = "prompt"
    """Column holding the chat-format prompt."""
    train_batch_size: int = Field(512, ge=1)
    """Groups (prompts) per training batch: the dynamic-sampling quota."""
    max_prompt_length: int = Field(2048, ge=1)
    """Prompts longer than this many tokens are rejected when the dataset loads."""
    max_response_length: int = Field(20480, ge=1)
    """Generation budget per sample, in tokens (the EOS token counts)."""
    shuffle: bool = True
    """Shuffle the prompts each epoch."""
    seed: int = 0
    """Seed of the shuffle."""
    prompt_template: PromptTemplate = "none"
    """Wrap each prompt in the DAPO math template (rows that already carry it are left alone)."""
    apply_chat_template: bool = True
    """Render prompts with the tokenizer's chat template when it has one."""


class ValKwargs(_Strict):
    temperature: float = Field(1.0, ge=0.0)
    """Sampling temperature for evaluation."""
    top_p: float = Field(0.7, gt=0.0, le=1.0)
    """Nucleus mass for evaluation (the DAPO eval uses 0.7)."""
    n: int = Field(32, ge=1)
    """Samples per problem for avg@n."""


class RolloutConfig(_Strict):
    engine: EngineName = "hf"
    """Inference engine: Hugging Face transformers (portable) or vLLM (GPU)."""
    n: int = Field(16, ge=2)
    """G: samples generated per prompt (a group)."""
    temperature: float = Field(1.0, gt=0.0)
    """Sampling temperature during training rollouts."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass during training rollouts."""
    top_k: int = Field(-1, ge=-1)
    """Top-k sampling; -1 disables it."""
    val_kwargs: ValKwargs = Field(default_factory=ValKwargs)
    """Sampling used by evaluation."""


class OptimConfig(_Strict):
    lr: float = Field(1e-6, gt=0.0)
    """Peak AdamW learning rate."""
    lr_warmup_steps: int = Field(20, ge=0)
    """Optimizer steps of linear warm-up, then constant."""
    weight_decay: float = Field(0.1, ge=0.0)
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    grad_clip: float = Field(1.0, gt=0.0)
    """Global gradient-norm clip."""


class ActorConfig(_Strict):
    ppo_mini_batch_size: int = Field(32, ge=1)
    """Groups per optimizer step; a training batch gives train_batch_size / this many steps."""
    ppo_micro_batch_size: int = Field(8, ge=1)
    """Samples per forward/backward pass (gradient accumulation unit)."""
    ppo_epochs: int = Field(1, ge=1)
    """Passes over each training batch."""
    clip_ratio_low: float = Field(0.2, ge=0.0, lt=1.0)
    """eps_low of Clip-Higher: ratio floor 1 - eps_low."""
    clip_ratio_high: float = Field(0.28, ge=0.0)
    """eps_high of Clip-Higher: ratio ceiling 1 + eps_high."""
    clip_ratio_c: float | None = Field(10.0, gt=1.0)
    """Dual-clip bound c for negative advantages; None disables dual clip."""
    loss_agg_mode: LossAggMode = "token-mean"
    """How per-token losses become one scalar (token-mean is DAPO's token-level loss)."""
    log_ratio_clamp: float = Field(20.0, gt=0.0)
    """|log r| is clamped to this before exp, for numeric safety."""
    entropy_coeff: float = Field(0.0, ge=0.0)
    """Weight of the entropy bonus (0 = off, as in DAPO)."""
    use_kl_loss: bool = False
    """Add a KL penalty to a frozen reference policy (off in DAPO)."""
    kl_loss_coef: float = Field(0.0, ge=0.0)
    """Weight of the KL penalty."""
    kl_loss_type: KLType = "k3"
    """KL estimator: k1 = log-ratio, k3 = low-variance (Schulman) estimator."""
    tis_imp_ratio_cap: float | None = Field(None, gt=0.0)
    """Cap of the truncated importance weight behaviour->old policy (None = off)."""
    recompute_old_log_prob: bool = True
    """Recompute old log-probs with the learner's weights instead of using the rollout ones."""
    overlong_filter: bool = False
    """Mask truncated samples out of the loss (the paper's overlong filtering ablation)."""
    bf16_autocast: bool = False
    """Run forward/backward under bf16 autocast."""
    optim: OptimConfig = Field(default_factory=OptimConfig)
    """Optimizer settings."""


class FilterGroupsConfig(_Strict):
    enable: bool = True
    """Dynamic sampling: drop groups whose metric is identical across all G samples."""
    metric: FilterMetric = "acc"
    """Per-sample value compared within a group."""
    max_num_gen_batches: int = Field(10, ge=0)
    """Generation rounds allowed to fill one batch before a clear error (0 = unlimited)."""


class AlgorithmConfig(_Strict):
    adv_estimator: Literal["grpo"] = "grpo"
    """Group-relative advantage."""
    norm_adv_by_std_in_grpo: bool = True
    """Divide by the group's unbiased std (False = Dr. GRPO)."""
    filter_groups: FilterGroupsConfig = Field(default_factory=FilterGroupsConfig)
    """Dynamic sampling."""
    max_staleness: int = Field(1, ge=0)
    """Groups generated more than this many policy versions ago are dropped (0 = on-policy)."""


class OverlongBufferConfig(_Strict):
    enable: bool = True
    """Soft overlong punishment on/off."""
    len: int = Field(4096, ge=1)
    """Lcache: length of the punishment interval before max_response_length."""
    penalty_factor: float = Field(1.0, ge=0.0)
    """Penalty at and beyond max_response_length."""


class RewardConfig(_Strict):
    mode: RewardMode = "dapo"
    """Verifier: official DAPO-compatible, strict \\boxed{}, or symbolic Math-Verify."""
    timeout_s: float = Field(2.0, gt=0.0)
    """Upper bound on one verification; a timeout scores -1."""
    overlong_buffer: OverlongBufferConfig = Field(default_factory=OverlongBufferConfig)
    """Soft overlong punishment."""


class TrainerConfig(_Strict):
    total_training_steps: int = Field(100, ge=1)
    """Training batches to consume before the run completes."""
    save_freq: int = Field(20, ge=0)
    """Write a checkpoint every N training batches (0 = only at the end)."""
    test_freq: int = Field(0, ge=0)
    """Evaluate every N training batches (0 = only before and after)."""
    max_in_flight: int = Field(0, ge=0)
    """Prompts dispatched but not yet scored (0 = 2 * train_batch_size)."""
    runs_dir: str = "runs"
    """Folder that holds one sub-folder per run."""


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
