"""Holdout statistics of a trained tokenizer."""

from __future__ import annotations

from tokenizers import Tokenizer

from model_trainer.api.tokenizer_job import TokenizerStats
from model_trainer.tokenizer.algorithms import text_chunks

BATCH_CHUNKS = 64


def holdout_stats(tokenizer: Tokenizer, holdout: str, unk_id: int | None) -> TokenizerStats:
    """Encode `holdout` in batches and measure compression and unknown tokens. With no holdout
    every rate is 0."""
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    n_tokens = 0
    n_unknown = 0
    unknown_chars = 0
    seen: set[int] = set()
    chunks = list(text_chunks(holdout))
    for start in range(0, len(chunks), BATCH_CHUNKS):
        batch = tokenizer.encode_batch(
            chunks[start : start + BATCH_CHUNKS], add_special_tokens=False
        )
        for encoding in batch:
            ids = encoding.ids
            n_tokens += len(ids)
            seen.update(ids)
            if unk_id is None:
                continue
            for token_id, (begin, end) in zip(ids, encoding.offsets, strict=True):
                if token_id == unk_id:
                    n_unknown += 1
                    unknown_chars += end - begin
    holdout_bytes = len(holdout.encode("utf-8"))
    return TokenizerStats(
        vocab_size=vocab_size,
        holdout_bytes=holdout_bytes,
        holdout_tokens=n_tokens,
        bytes_per_token=holdout_bytes / n_tokens if n_tokens else 0.0,
        unknown_rate=n_unknown / n_tokens if n_tokens else 0.0,
        character_coverage=1.0 - unknown_chars / len(holdout) if holdout else 0.0,
        vocab_used_fraction=len(seen) / vocab_size if vocab_size else 0.0,
    )
