"""TokenizerJob: train a tokenizer on a corpus."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, StringConstraints, model_validator

from model_trainer.api.common import (
    ApiModel,
    CorpusSource,
    JobStatus,
    ObjectMeta,
    RuntimeSpec,
)

BYTE_ALPHABET_SIZE = 256
DEFAULT_SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]


class TokenizerJobSpec(RuntimeSpec):
    """Desired tokenizer."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.algorithm != 'bpe' "
                    "|| self.vocabSize >= 256 + size(self.specialTokens)",
                    "message": "vocabSize of a byte-level bpe tokenizer must cover the 256 byte "
                    "alphabet plus the special tokens",
                },
                {
                    "rule": "self.algorithm == oldSelf.algorithm "
                    "&& self.vocabSize == oldSelf.vocabSize "
                    "&& self.minFrequency == oldSelf.minFrequency "
                    "&& self.specialTokens == oldSelf.specialTokens "
                    "&& self.unkToken == oldSelf.unkToken "
                    "&& self.holdoutFraction == oldSelf.holdoutFraction "
                    "&& self.seed == oldSelf.seed && self.corpus == oldSelf.corpus",
                    "message": "the tokenizer settings and the corpus are immutable",
                },
                {"rule": "!oldSelf.cancel || self.cancel", "message": "cancel cannot be undone"},
            ]
        }
    )

    algorithm: Literal["bpe", "unigram", "wordpiece"] = "bpe"
    """bpe (byte-level), unigram or wordpiece."""
    vocab_size: int = Field(default=8192, ge=32, le=1_000_000)
    """Target vocabulary size, special tokens included."""
    min_frequency: int = Field(default=2, ge=1)
    """Minimum count of a pair to be merged (bpe, wordpiece)."""
    special_tokens: list[Annotated[str, StringConstraints(min_length=1, max_length=64)]] = Field(
        default=list(DEFAULT_SPECIAL_TOKENS),
        max_length=64,
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    """Tokens added verbatim with the first ids. The first is end-of-text, the second padding."""
    unk_token: str = Field(default="<|unk|>", min_length=1, max_length=64)
    """Unknown token of unigram and wordpiece. Byte-level bpe needs none."""
    holdout_fraction: float = Field(default=0.05, ge=0.0, le=0.5)
    """Last fraction of the corpus, cut at a line boundary, kept out of training for statistics."""
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    """Seed, for reproducible outputs."""
    corpus: CorpusSource
    """Training text."""

    @model_validator(mode="after")
    def _vocab_covers_alphabet(self) -> TokenizerJobSpec:
        needed = BYTE_ALPHABET_SIZE + len(self.special_tokens)
        if self.algorithm == "bpe" and self.vocab_size < needed:
            raise ValueError(
                f"vocabSize {self.vocab_size} is below the byte-level alphabet: bpe needs at least "
                f"{needed} (256 bytes + {len(self.special_tokens)} special tokens)"
            )
        if len(set(self.special_tokens)) != len(self.special_tokens):
            raise ValueError("specialTokens must be unique")
        return self


class TokenizerStats(ApiModel):
    """Statistics of the trained tokenizer on the holdout."""

    vocab_size: int
    """Actual vocabulary size."""
    holdout_bytes: int
    """UTF-8 bytes in the holdout."""
    holdout_tokens: int
    """Tokens in the encoded holdout."""
    bytes_per_token: float
    """Compression: holdout bytes / holdout tokens."""
    unknown_rate: float
    """Fraction of holdout tokens that are the unknown token."""
    character_coverage: float
    """Fraction of holdout characters that encode without the unknown token."""
    vocab_used_fraction: float
    """Fraction of the vocabulary seen in the encoded holdout."""


class TokenizerJobStatus(JobStatus):
    """Observed state of a TokenizerJob."""

    stats: TokenizerStats | None = None
    """Holdout statistics, once trained."""


class TokenizerJob(ApiModel):
    """A tokenizer trained on a corpus; its tokenizer.json lands on the artifacts volume."""

    api_version: Literal["modeltrainer.io/v1alpha1"] = "modeltrainer.io/v1alpha1"
    kind: Literal["TokenizerJob"] = "TokenizerJob"
    metadata: ObjectMeta
    spec: TokenizerJobSpec
    status: TokenizerJobStatus | None = None
