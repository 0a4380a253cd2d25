"""Learning rate: linear warm-up to the peak, then cosine decay to peak * minLearningRateRatio."""

from __future__ import annotations

import math

from model_trainer.api.training_run import TrainingSpec


def learning_rate_at(step: int, training: TrainingSpec) -> float:
    """Learning rate of the optimizer step that `step` steps have preceded (0-based)."""
    peak = training.learning_rate
    floor = peak * training.min_learning_rate_ratio
    warmup = training.warmup_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    decay_steps = training.max_steps - warmup
    if decay_steps <= 1:
        return peak
    progress = min(1.0, (step - warmup) / (decay_steps - 1))
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))
