"""One optimizer step: micro-batches with autocast and chunked loss, clipping, AdamW."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import GPT2LMHeadModel

from model_trainer import log
from model_trainer.api.training_run import TrainingSpec
from model_trainer.lm.data import WindowSampler
from model_trainer.lm.device import Runtime
from model_trainer.lm.loss import linear_cross_entropy_sum
from model_trainer.lm.optim import set_learning_rate
from model_trainer.lm.schedule import learning_rate_at

logger = log.get_logger(__name__)


class StepRunner:
    """Runs training steps on `model`. With `compile`, the transformer body runs through
    torch.compile; if compiling fails on the first step, it falls back to eager, logged."""

    def __init__(
        self,
        model: GPT2LMHeadModel,
        optimizer: torch.optim.Optimizer,
        sampler: WindowSampler,
        training: TrainingSpec,
        runtime: Runtime,
        *,
        compile: bool = False,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.sampler = sampler
        self.training = training
        self.runtime = runtime
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._compiled: nn.Module | None = None
        self._compile_proven = False
        if compile:
            compiled = torch.compile(model.transformer)
            if isinstance(compiled, nn.Module):
                self._compiled = compiled

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    def _loss(self, body: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss of one micro-batch."""
        dtype = self.runtime.autocast_dtype
        with torch.autocast(self.runtime.device.type, dtype=dtype, enabled=dtype is not None):
            hidden = body(input_ids=inputs).last_hidden_state
        total = linear_cross_entropy_sum(
            hidden, self.model.lm_head.weight, targets, compute_dtype=dtype or torch.float32
        )
        return total / targets.numel()

    def _micro_batch(self, inputs: torch.Tensor, targets: torch.Tensor, scale: float) -> float:
        """Forward and backward of one micro-batch; returns its (unscaled) loss."""
        if self._compiled is not None:
            try:
                loss = self._loss(self._compiled, inputs, targets)
                torch.autograd.backward(loss * scale)
                self._compile_proven = True
                return float(loss.detach())
            except Exception as exc:  # inductor raises many types; only the first call may
                if self._compile_proven:
                    raise
                logger.warning("compile_failed_falling_back_to_eager", error=str(exc)[:2000])
                self._compiled = None
                self.optimizer.zero_grad(set_to_none=True)
        loss = self._loss(self.model.transformer, inputs, targets)
        torch.autograd.backward(loss * scale)
        return float(loss.detach())

    def step(self, step_index: int, cancel_requested: Callable[[], bool]) -> float | None:
        """Run optimizer step `step_index` (0-based); return the mean training loss, or None if
        cancellation was requested between micro-batches (the gradients are dropped)."""
        set_learning_rate(self.optimizer, learning_rate_at(step_index, self.training))
        accumulation = self.training.gradient_accumulation
        total = 0.0
        for micro in range(accumulation):
            if micro > 0 and cancel_requested():
                self.optimizer.zero_grad(set_to_none=True)
                return None
            inputs, targets = self.sampler.batch(self.training.batch_size)
            device = self.runtime.device
            total += self._micro_batch(
                inputs.to(device, non_blocking=True),
                targets.to(device, non_blocking=True),
                1.0 / accumulation,
            )
        if self.training.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.training.grad_clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / accumulation
