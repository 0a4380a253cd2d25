"""AdamW with weight decay on matrices only."""

from __future__ import annotations

import torch
from torch import nn

from model_trainer.api.training_run import TrainingSpec

ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8


def parameter_groups(
    model: nn.Module, weight_decay: float
) -> list[dict[str, list[nn.Parameter] | float]]:
    """Matrices and embeddings (>= 2-D) decay; biases and LayerNorm gains do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module, training: TrainingSpec, *, fused: bool = True
) -> torch.optim.AdamW:
    """`fused` runs the update as one kernel per parameter group (CPU and CUDA)."""
    return torch.optim.AdamW(
        parameter_groups(model, training.weight_decay),
        lr=training.learning_rate,
        betas=ADAM_BETAS,
        eps=ADAM_EPS,
        fused=fused,
    )


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
