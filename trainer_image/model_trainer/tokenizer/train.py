"""Train a tokenizer for a TokenizerJob and write tokenizer.json plus its manifest."""

from __future__ import annotations

import contextlib
import platform
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import tokenizers
from pydantic import JsonValue

import model_trainer
from model_trainer import log
from model_trainer.api.common import ArtifactsStatus, Progress
from model_trainer.api.tokenizer_job import TokenizerJob, TokenizerStats
from model_trainer.artifacts import (
    TOKENIZER_FILE,
    atomic_write_bytes,
    retire_manifest,
    write_manifest,
)
from model_trainer.corpus import CorpusContext, load_corpus, split_holdout
from model_trainer.errors import ArtifactWriteError, InvalidInputError, JobCancelled
from model_trainer.reporting import Reporter
from model_trainer.tokenizer.algorithms import special_tokens_of, train_model, unk_token_of
from model_trainer.tokenizer.stats import holdout_stats

logger = log.get_logger(__name__)


@dataclass(frozen=True)
class TokenizerResult:
    tokenizer_path: Path
    stats: TokenizerStats
    manifest_sha256: str
    duration_seconds: float
    """Wall time of the whole job: corpus, training, statistics and writes."""
    train_seconds: float
    """Wall time of the training step alone."""


def train_tokenizer(
    job: TokenizerJob, out_dir: Path, ctx: CorpusContext, reporter: Reporter
) -> TokenizerResult:
    spec = job.spec
    started_at = _utc_now()
    started = time.monotonic()
    _prepare(out_dir)
    logger.info(
        "tokenizer_training_started",
        algorithm=spec.algorithm,
        vocab_size=spec.vocab_size,
        corpus=spec.corpus.describe(),
        out_dir=str(out_dir),
    )
    reporter.progress(Progress(step=0, total_steps=1, percent=0))

    corpus = load_corpus(spec.corpus, ctx)
    split = split_holdout(corpus.text, spec.holdout_fraction)
    train_bytes = len(split.train.encode("utf-8"))
    logger.info(
        "corpus_loaded",
        source=corpus.source,
        sha256=corpus.sha256,
        bytes=corpus.n_bytes,
        train_bytes=train_bytes,
        holdout_bytes=split.holdout_bytes,
    )
    if reporter.cancel_requested():
        raise JobCancelled("cancelled before training")

    train_started = time.monotonic()
    tokenizer = train_model(spec, split.train)
    train_seconds = time.monotonic() - train_started
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab_size > spec.vocab_size:
        raise InvalidInputError(
            f"vocabSize {spec.vocab_size} is too small: the {spec.algorithm} tokenizer of this "
            f"corpus needs {vocab_size} tokens"
        )
    if vocab_size < spec.vocab_size:
        logger.warning(
            "tokenizer_vocab_below_target", vocab_size=vocab_size, target=spec.vocab_size
        )
    unk = unk_token_of(spec)
    stats = holdout_stats(
        tokenizer, split.holdout, None if unk is None else tokenizer.token_to_id(unk)
    )
    if not split.holdout:
        logger.warning("tokenizer_stats_without_holdout", holdout_fraction=spec.holdout_fraction)
    logger.info(
        "tokenizer_trained",
        train_seconds=round(train_seconds, 3),
        train_mb_per_second=round(train_bytes / 1e6 / max(train_seconds, 1e-9), 3),
        special_tokens=special_tokens_of(spec),
        **stats.model_dump(),
    )
    if reporter.cancel_requested():
        raise JobCancelled("cancelled after training, before writing the tokenizer")

    tokenizer_path = out_dir / TOKENIZER_FILE
    atomic_write_bytes(tokenizer_path, tokenizer.to_str(pretty=True).encode("utf-8"))
    duration = time.monotonic() - started
    manifest: dict[str, JsonValue] = {
        "kind": "TokenizerJob",
        "name": job.metadata.name,
        "namespace": job.metadata.namespace,
        "uid": job.metadata.uid,
        "status": "succeeded",
        "config": spec.model_dump(mode="json", by_alias=True),
        "stats": stats.model_dump(mode="json", by_alias=True),
        "corpus": {
            "source": corpus.source,
            "sha256": corpus.sha256,
            "bytes": corpus.n_bytes,
            "trainBytes": train_bytes,
            "holdoutBytes": split.holdout_bytes,
        },
        "versions": {
            "python": platform.python_version(),
            "tokenizers": tokenizers.__version__,
            "model_trainer": model_trainer.__version__,
        },
        "startedAt": started_at,
        "finishedAt": _utc_now(),
        "durationSeconds": round(duration, 3),
    }
    try:
        manifest_sha256 = write_manifest(out_dir, manifest)
    except ArtifactWriteError:
        # Without its manifest the tokenizer is not a result; leave nothing a TrainingRun
        # could pick up.
        with contextlib.suppress(OSError):
            tokenizer_path.unlink(missing_ok=True)
        raise
    reporter.progress(Progress(step=1, total_steps=1, percent=100))
    reporter.artifacts(ArtifactsStatus(path=str(out_dir), manifest_sha256=manifest_sha256))
    logger.info(
        "tokenizer_artifacts_written", path=str(tokenizer_path), manifest_sha256=manifest_sha256
    )
    return TokenizerResult(
        tokenizer_path=tokenizer_path,
        stats=stats,
        manifest_sha256=manifest_sha256,
        duration_seconds=duration,
        train_seconds=train_seconds,
    )


def _prepare(out_dir: Path) -> None:
    """Create the output directory and retire an earlier manifest, so that nothing presents a
    failure of this run as an earlier run's result."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArtifactWriteError(f"cannot create {out_dir}: {exc.strerror or exc}") from exc
    retire_manifest(out_dir)


def _utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
