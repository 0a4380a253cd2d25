"""Holdout evaluation: mean nats per predicted token, perplexity and bits per byte.

Evaluation always runs in fp32 and eval mode, so that its figures are comparable across
precisions and machines, and it never reuses a training batch's loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import GPT2LMHeadModel

from model_trainer import artifacts, log
from model_trainer.api.common import CorpusSource, EvalMetrics
from model_trainer.artifacts import MODEL_FILES, TOKENIZER_FILE
from model_trainer.corpus import CorpusContext, load_corpus, split_holdout
from model_trainer.errors import InvalidInputError
from model_trainer.lm import device as lm_device
from model_trainer.lm.data import IGNORE_INDEX, EvalSet, eval_batches, eval_set
from model_trainer.lm.loss import linear_cross_entropy_sum
from model_trainer.lm.model import (
    context_length,
    move_to,
    special_tokens,
)
from model_trainer.lm.outputs import no_progress_bars
from model_trainer.tokenizer import load_tokenizer

logger = log.get_logger(__name__)

# exp() of a loss above this overflows a float; no real model gets near it.
_MAX_EXP_ARGUMENT = 700.0


@dataclass(frozen=True)
class LossTotals:
    nats: float
    tokens: int


def evaluate_tokens(
    model: GPT2LMHeadModel,
    tokens: torch.Tensor,
    *,
    batch_size: int,
    pad_id: int,
    device: torch.device,
) -> LossTotals:
    """Summed cross-entropy over non-overlapping windows; padding never counts."""
    was_training = model.training
    model.train(False)
    nats = torch.zeros((), dtype=torch.float64)
    count = 0
    try:
        with torch.no_grad():
            for batch in eval_batches(tokens, context_length(model), batch_size, pad_id):
                mask = batch.attention_mask
                hidden = model.transformer(
                    input_ids=batch.input_ids.to(device),
                    attention_mask=None if mask is None else mask.to(device),
                ).last_hidden_state
                labels = batch.labels.to(device)
                total = linear_cross_entropy_sum(hidden, model.lm_head.weight, labels)
                nats += total.double().cpu()
                count += int((labels != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    return LossTotals(float(nats), count)


def metrics_from(totals: LossTotals, n_bytes: int, step: int = 0) -> EvalMetrics:
    loss = totals.nats / max(1, totals.tokens)
    return EvalMetrics(
        loss=loss,
        perplexity=math.exp(min(loss, _MAX_EXP_ARGUMENT)),
        bits_per_byte=totals.nats / max(1, n_bytes) / math.log(2),
        tokens=totals.tokens,
        step=step,
    )


def evaluate_set(
    model: GPT2LMHeadModel,
    data: EvalSet,
    *,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    step: int = 0,
) -> EvalMetrics:
    totals = evaluate_tokens(
        model, data.tokens, batch_size=batch_size, pad_id=pad_id, device=device
    )
    return metrics_from(totals, data.n_bytes, step)


def load_trained_model(model_dir: Path, device: torch.device) -> GPT2LMHeadModel:
    missing = [name for name in MODEL_FILES if not (model_dir / name).is_file()]
    if missing:
        raise InvalidInputError(f"{model_dir} holds no trained model: {', '.join(missing)} missing")
    with no_progress_bars():
        model: object = GPT2LMHeadModel.from_pretrained(model_dir)
    if not isinstance(model, GPT2LMHeadModel):
        raise InvalidInputError(f"{model_dir} does not hold a GPT-2 language model")
    move_to(model, device)
    return model


def evaluate_model(
    model_dir: Path, text: str, *, max_tokens: int | None = None, batch_size: int = 8
) -> EvalMetrics:
    """Evaluate a finished model (model.safetensors, config.json, tokenizer.json in model_dir)
    on `text`, or on its first `max_tokens` tokens."""
    lm_device.apply_threads()
    device = lm_device.choose_device()
    tokenizer = load_tokenizer(model_dir / TOKENIZER_FILE)
    model = load_trained_model(model_dir, device)
    data = eval_set(tokenizer, text, max_tokens)
    return evaluate_set(
        model,
        data,
        batch_size=batch_size,
        pad_id=special_tokens(tokenizer).pad_id,
        device=device,
    )


def evaluate_run_dir(
    model_dir: Path,
    corpus: CorpusSource,
    ctx: CorpusContext,
    split: Literal["holdout", "train", "all"],
    holdout_fraction: float,
    out_file: Path | None = None,
    *,
    max_tokens: int | None = None,
    batch_size: int = 8,
) -> EvalMetrics:
    """Evaluate a finished model on a split of a corpus; write the metrics JSON if asked."""
    text = load_corpus(corpus, ctx).text
    if split != "all":
        parts = split_holdout(text, holdout_fraction)
        text = parts.holdout if split == "holdout" else parts.train
    metrics = evaluate_model(model_dir, text, max_tokens=max_tokens, batch_size=batch_size)
    logger.info(
        "model_evaluated",
        model_dir=str(model_dir),
        corpus=corpus.describe(),
        split=split,
        loss=metrics.loss,
        bits_per_byte=metrics.bits_per_byte,
        tokens=metrics.tokens,
    )
    if out_file is not None:
        artifacts.atomic_write_json(out_file, metrics.model_dump(mode="json", by_alias=True))
    return metrics
