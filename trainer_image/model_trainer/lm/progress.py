"""Training progress: smoothed loss, throughput, ETA, and when to log a progress line."""

from __future__ import annotations

import time
from collections import deque

from model_trainer.api.common import Progress

LOSS_EMA_DECAY = 0.9
THROUGHPUT_WINDOW_STEPS = 20
LOG_EVERY_SECONDS = 10.0
LOG_EVERY_FRACTION = 0.1


class ProgressTracker:
    """Fed once per optimizer step. Throughput is measured over the last few steps, so that a
    slow first step (compilation, warm-up) soon stops distorting it."""

    def __init__(
        self,
        *,
        total_steps: int,
        tokens_per_step: int,
        start_step: int,
        smoothed_loss: float | None = None,
    ) -> None:
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self.smoothed_loss = smoothed_loss
        self.step = start_step
        self.train_seconds = 0.0
        self.session_steps = 0
        self._durations: deque[float] = deque(maxlen=THROUGHPUT_WINDOW_STEPS)
        self._logged_step = start_step
        self._logged_at = time.monotonic()

    def update(self, step: int, loss: float, seconds: float) -> Progress:
        self.step = step
        self.train_seconds += seconds
        self.session_steps += 1
        self._durations.append(seconds)
        if self.smoothed_loss is None:
            self.smoothed_loss = loss
        else:
            self.smoothed_loss = LOSS_EMA_DECAY * self.smoothed_loss + (1 - LOSS_EMA_DECAY) * loss
        step_seconds = sum(self._durations) / len(self._durations)
        return Progress(
            step=step,
            total_steps=self.total_steps,
            percent=min(100, step * 100 // max(1, self.total_steps)),
            loss=self.smoothed_loss,
            tokens_per_second=self.tokens_per_step / step_seconds if step_seconds > 0 else None,
            eta_seconds=max(0.0, (self.total_steps - step) * step_seconds),
        )

    @property
    def session_tokens_per_second(self) -> float:
        """Mean throughput of the steps this process ran."""
        if self.train_seconds <= 0:
            return 0.0
        return self.session_steps * self.tokens_per_step / self.train_seconds

    def should_log(self) -> bool:
        """Every LOG_EVERY_SECONDS, every LOG_EVERY_FRACTION of the run, and at the end."""
        now = time.monotonic()
        every = max(1, int(self.total_steps * LOG_EVERY_FRACTION))
        due = (
            self.step >= self.total_steps
            or self.step - self._logged_step >= every
            or now - self._logged_at >= LOG_EVERY_SECONDS
        )
        if due:
            self._logged_step, self._logged_at = self.step, now
        return due
