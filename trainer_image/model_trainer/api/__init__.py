"""Typed API of the `modeltrainer.io/v1alpha1` resources: the single source of truth."""

from model_trainer.api.common import (
    API_VERSION,
    GROUP,
    VERSION,
    ArtifactsStatus,
    Condition,
    ConfigMapKeyRef,
    CorpusSource,
    EvalMetrics,
    ObjectMeta,
    Phase,
    Progress,
)
from model_trainer.api.tokenizer_job import TokenizerJob, TokenizerJobSpec, TokenizerJobStatus
from model_trainer.api.training_run import (
    EvaluationRequest,
    EvaluationResult,
    EvaluationSpec,
    ModelSpec,
    TrainingRun,
    TrainingRunSpec,
    TrainingRunStatus,
    TrainingSpec,
)

__all__ = [
    "API_VERSION",
    "GROUP",
    "VERSION",
    "ArtifactsStatus",
    "Condition",
    "ConfigMapKeyRef",
    "CorpusSource",
    "EvalMetrics",
    "EvaluationRequest",
    "EvaluationResult",
    "EvaluationSpec",
    "ModelSpec",
    "ObjectMeta",
    "Phase",
    "Progress",
    "TokenizerJob",
    "TokenizerJobSpec",
    "TokenizerJobStatus",
    "TrainingRun",
    "TrainingRunSpec",
    "TrainingRunStatus",
    "TrainingSpec",
]
