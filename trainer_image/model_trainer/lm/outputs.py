"""The finished run's files in out_dir: model, tokenizer, metrics, samples and manifest."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Protocol

import torch
from pydantic import JsonValue
from safetensors import SafetensorError
from transformers import GPT2LMHeadModel
from transformers.utils import logging as hf_logging

import model_trainer
from model_trainer import artifacts
from model_trainer.api.common import EvalMetrics
from model_trainer.artifacts import TOKENIZER_FILE
from model_trainer.errors import ArtifactWriteError
from model_trainer.lm.samples import Sample

METRICS_FILE = "eval/metrics.json"
SAMPLES_FILE = "eval/samples.jsonl"


def save_model(model: GPT2LMHeadModel, out_dir: Path, tokenizer_path: Path) -> None:
    """model.safetensors, config.json (and generation_config.json) via save_pretrained, plus a
    copy of tokenizer.json; each file lands under its final name atomically."""
    tmp: Path | None = None
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".model-", suffix=".tmp", dir=out_dir))
        with no_progress_bars():
            model.save_pretrained(tmp)
        for path in sorted(tmp.iterdir()):
            with path.open("rb+") as handle:
                os.fsync(handle.fileno())
            path.replace(out_dir / path.name)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise ArtifactWriteError(f"disk full while saving the model to {out_dir}") from exc
        raise ArtifactWriteError(f"could not save the model to {out_dir}: {exc}") from exc
    except SafetensorError as exc:
        raise ArtifactWriteError(f"could not save the model to {out_dir}: {exc}") from exc
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer_bytes = tokenizer_path.read_bytes()
    except OSError as exc:
        raise ArtifactWriteError(f"could not copy {tokenizer_path}: {exc.strerror}") from exc
    artifacts.atomic_write_bytes(out_dir / TOKENIZER_FILE, tokenizer_bytes)


class _ProgressBars(Protocol):
    """The part of transformers.utils.logging used here (untyped upstream)."""

    def is_progress_bar_enabled(self) -> bool: ...
    def disable_progress_bar(self) -> None: ...
    def enable_progress_bar(self) -> None: ...


_progress_bars: _ProgressBars = hf_logging


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """Without transformers' progress bars, which would only clutter the job log."""
    bar_was_enabled = _progress_bars.is_progress_bar_enabled()
    _progress_bars.disable_progress_bar()
    try:
        yield
    finally:
        if bar_was_enabled:
            _progress_bars.enable_progress_bar()


def _metrics_json(metrics: EvalMetrics) -> JsonValue:
    return metrics.model_dump(mode="json", by_alias=True)


def write_metrics(
    out_dir: Path, final: EvalMetrics | None, history: tuple[EvalMetrics, ...]
) -> None:
    artifacts.atomic_write_json(
        out_dir / METRICS_FILE,
        {
            "final": None if final is None else _metrics_json(final),
            "history": [_metrics_json(m) for m in history],
        },
    )


def write_samples(out_dir: Path, samples: list[Sample]) -> None:
    lines = "".join(
        json.dumps({"prompt": s.prompt, "completion": s.completion}, ensure_ascii=False) + "\n"
        for s in samples
    )
    artifacts.atomic_write_bytes(out_dir / SAMPLES_FILE, lines.encode("utf-8"))


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, JsonValue]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "tokenizers": _version("tokenizers"),
        "safetensors": _version("safetensors"),
        "model_trainer": model_trainer.__version__,
    }


@dataclass(frozen=True)
class SystemInfo:
    device: str
    precision: str
    threads: int
    compiled: bool

    def to_json(self) -> dict[str, JsonValue]:
        return {
            "platform": platform.platform(),
            "machine": platform.machine(),
            "python": sys.version.split()[0],
            "cpuCount": os.cpu_count(),
            "threads": self.threads,
            "device": self.device,
            "precision": self.precision,
            "compiled": self.compiled,
        }


@dataclass(frozen=True)
class Timings:
    started_at: str
    finished_at: str
    duration_seconds: float
    tokens_per_second: float

    def to_json(self) -> dict[str, JsonValue]:
        return {
            "startedAt": self.started_at,
            "finishedAt": self.finished_at,
            "durationSeconds": round(self.duration_seconds, 3),
            "tokensPerSecond": round(self.tokens_per_second, 1),
        }
