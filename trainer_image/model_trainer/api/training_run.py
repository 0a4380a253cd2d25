"""TrainingRun: train a small GPT-2 model with a trained tokenizer."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, StringConstraints, model_validator

from model_trainer.api.common import (
    DNS_SUBDOMAIN_PATTERN,
    ApiModel,
    CorpusSource,
    EvalMetrics,
    JobStatus,
    ObjectMeta,
    Phase,
    RuntimeSpec,
)

DEFAULT_SAMPLE_PROMPTS = ["The ", "def ", "import "]


class TokenizerRef(ApiModel):
    """A TokenizerJob in the same namespace."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)
    """Name of the TokenizerJob."""


class ModelSpec(ApiModel):
    """GPT-2 architecture."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.nEmbd % self.nHead == 0",
                    "message": "nEmbd must be divisible by nHead",
                },
            ]
        }
    )

    n_layer: int = Field(default=4, ge=1, le=48)
    """Transformer blocks."""
    n_head: int = Field(default=4, ge=1, le=64)
    """Attention heads per block."""
    n_embd: int = Field(default=256, ge=8, le=4096)
    """Embedding width; a multiple of nHead."""
    context_length: int = Field(default=256, ge=8, le=8192)
    """Tokens per training window and maximum positions."""
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Dropout of embeddings, attention and residuals."""

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelSpec:
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"nEmbd ({self.n_embd}) must be divisible by nHead ({self.n_head})")
        return self


class TrainingSpec(ApiModel):
    """Optimisation settings."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.warmupSteps <= self.maxSteps",
                    "message": "warmupSteps must not exceed maxSteps",
                },
            ]
        }
    )

    max_steps: int = Field(default=1000, ge=1, le=10_000_000)
    """Optimizer steps."""
    batch_size: int = Field(default=8, ge=1, le=4096)
    """Windows per micro-batch."""
    gradient_accumulation: int = Field(default=1, ge=1, le=1024)
    """Micro-batches per optimizer step."""
    learning_rate: float = Field(default=3e-4, gt=0.0, le=1.0)
    """Peak learning rate of AdamW."""
    min_learning_rate_ratio: float = Field(default=0.1, ge=0.0, le=1.0)
    """Cosine decay ends at learningRate times this."""
    warmup_steps: int = Field(default=100, ge=0)
    """Linear warm-up steps before the cosine decay."""
    weight_decay: float = Field(default=0.1, ge=0.0, le=1.0)
    """AdamW weight decay, applied to matrices only."""
    grad_clip: float = Field(default=1.0, ge=0.0)
    """Clip the gradient norm to this; 0 turns clipping off."""
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    """Seed of initialisation, data order and dropout."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto uses bf16 autocast where the CPU runs it fast, fp32 otherwise."""
    eval_every: int = Field(default=200, ge=1)
    """Evaluate on the holdout every this many steps, and at the end."""
    checkpoint_every: int = Field(default=200, ge=1)
    """Write a resumable checkpoint every this many steps."""

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainingSpec:
        if self.warmup_steps > self.max_steps:
            raise ValueError(
                f"warmupSteps ({self.warmup_steps}) must not exceed maxSteps ({self.max_steps})"
            )
        return self


class EvaluationSpec(ApiModel):
    """How the holdout evaluation and the samples are made."""

    max_tokens: int | None = Field(default=None, ge=1)
    """Evaluate on a fixed sample of this many holdout tokens; unset means the whole holdout."""
    sample_prompts: list[Annotated[str, StringConstraints(min_length=1, max_length=1024)]] = Field(
        default=list(DEFAULT_SAMPLE_PROMPTS), max_length=64
    )
    """Prompts of the generations in eval/samples.jsonl."""
    sample_max_new_tokens: int = Field(default=48, ge=1, le=4096)
    """Tokens generated per prompt."""


DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class EvaluationRequest(ApiModel):
    """An extra evaluation of the finished model, run in a pod of its own once the run has
    Succeeded. Its result lands in status.evaluations and in eval/<name>/metrics.json."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self == oldSelf",
                    "message": "an evaluation cannot be changed; add one under a new name",
                },
            ]
        }
    )

    name: str = Field(min_length=1, max_length=40, pattern=DNS_LABEL_PATTERN)
    """Name of the evaluation, unique in the run; a DNS label."""
    corpus: CorpusSource | None = None
    """Text to evaluate on. Defaults to the run's own corpus."""
    split: Literal["holdout", "train", "all"] = "holdout"
    """Part of the corpus: the holdout (cut with the run's holdoutFraction), the rest, or all."""
    max_tokens: int | None = Field(default=None, ge=1)
    """Evaluate on a fixed sample of this many tokens; unset means the whole split."""


class EvaluationResult(ApiModel):
    """The outcome of one requested evaluation."""

    name: str
    """Name of the evaluation request."""
    phase: Phase = Phase.PENDING
    """Pending, Running, Succeeded, Failed or Cancelled."""
    reason: str | None = None
    """Machine-readable reason of the phase."""
    message: str | None = None
    """Human-readable detail."""
    metrics: EvalMetrics | None = None
    """Loss, perplexity and bits per byte, once Succeeded."""
    path: str | None = None
    """The metrics file, relative to the run's artifacts directory."""
    attempts: int = Field(default=0, ge=0)
    """Evaluation pods started."""
    completion_time: str | None = None
    """RFC 3339 time the evaluation finished."""


class TrainingRunSpec(RuntimeSpec):
    """Desired model."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.tokenizerRef == oldSelf.tokenizerRef "
                    "&& self.corpus == oldSelf.corpus "
                    "&& self.holdoutFraction == oldSelf.holdoutFraction "
                    "&& self.model == oldSelf.model && self.training == oldSelf.training",
                    "message": "tokenizerRef, corpus, holdoutFraction, model and training are "
                    "immutable",
                },
                {"rule": "!oldSelf.cancel || self.cancel", "message": "cancel cannot be undone"},
            ]
        }
    )

    tokenizer_ref: TokenizerRef
    """The TokenizerJob whose tokenizer this run uses."""
    corpus: CorpusSource
    """Training text."""
    holdout_fraction: float = Field(default=0.05, gt=0.0, le=0.5)
    """Last fraction of the corpus, cut at a line boundary, used only for evaluation."""
    model: ModelSpec = Field(default=ModelSpec())
    """Architecture."""
    training: TrainingSpec = Field(default=TrainingSpec())
    """Optimisation."""
    evaluation: EvaluationSpec = Field(default=EvaluationSpec())
    """Evaluation and samples."""
    evaluations: list[EvaluationRequest] = Field(
        default=[],
        max_length=32,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    """Extra evaluations of the finished model on a chosen corpus or split. Add one at any time;
    each runs once, after the run has Succeeded."""


class TrainingRunStatus(JobStatus):
    """Observed state of a TrainingRun."""

    eval: EvalMetrics | None = None
    """Latest holdout evaluation."""
    evaluations: list[EvaluationResult] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    """Results of spec.evaluations, by name."""


class TrainingRun(ApiModel):
    """A GPT-2 model trained on a corpus with a tokenizer from a TokenizerJob."""

    api_version: Literal["modeltrainer.io/v1alpha1"] = "modeltrainer.io/v1alpha1"
    kind: Literal["TrainingRun"] = "TrainingRun"
    metadata: ObjectMeta
    spec: TrainingRunSpec
    status: TrainingRunStatus | None = None
