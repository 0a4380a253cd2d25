"""Token streams: the train split as one flat tensor sampled in random windows, and the
holdout cut into non-overlapping evaluation windows."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders

from model_trainer.errors import InvalidInputError

ENCODE_CHUNK_CHARS = 1 << 18
ENCODE_BATCH_CHUNKS = 16
IGNORE_INDEX = -100
"""Label of positions that never count in the loss (padding)."""


def split_for_encoding(text: str, chunk_chars: int = ENCODE_CHUNK_CHARS) -> list[str]:
    """Cut `text` into pieces of about `chunk_chars` characters, each cut right after a newline
    that is followed by a non-space character. Byte-level BPE pre-tokens never span such a
    boundary, so encoding the pieces gives exactly the ids of encoding the whole text."""
    pieces: list[str] = []
    start = 0
    while len(text) - start > chunk_chars:
        cut = _safe_cut(text, start + chunk_chars)
        if cut < 0:
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return [p for p in pieces if p]


def _safe_cut(text: str, position: int) -> int:
    """The first index at or after `position` that follows a newline and precedes a non-space
    character, or -1 if there is none."""
    newline = text.find("\n", position)
    while 0 <= newline < len(text) - 1:
        if not text[newline + 1].isspace():
            return newline + 1
        newline = text.find("\n", newline + 1)
    return -1


def encode_text(tokenizer: Tokenizer, text: str) -> torch.Tensor:
    """All of `text` as one flat int32 tensor of token ids (no special tokens added)."""
    pieces = split_for_encoding(text)
    parts: list[torch.Tensor] = []
    for first in range(0, len(pieces), ENCODE_BATCH_CHUNKS):
        batch = pieces[first : first + ENCODE_BATCH_CHUNKS]
        encodings = tokenizer.encode_batch_fast(batch, add_special_tokens=False)
        parts.extend(torch.tensor(e.ids, dtype=torch.int32) for e in encodings)
    if not parts:
        return torch.zeros(0, dtype=torch.int32)
    return torch.cat(parts)


class WindowSampler:
    """Random contiguous windows of `window` tokens, drawn with its own seeded generator so
    that the data order is reproducible and resumable."""

    def __init__(self, tokens: torch.Tensor, window: int, seed: int) -> None:
        if tokens.numel() < window:
            raise ValueError(f"{tokens.numel()} tokens cannot fill a window of {window}")
        self.tokens = tokens
        self.window = window
        self.generator = torch.Generator().manual_seed(seed)
        self._offsets = torch.arange(window)

    def batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, both (batch_size, window - 1) int64."""
        high = self.tokens.numel() - self.window + 1
        starts = torch.randint(0, high, (batch_size,), generator=self.generator)
        windows = self.tokens[starts[:, None] + self._offsets].long()
        return windows[:, :-1], windows[:, 1:]


def train_stream(tokenizer: Tokenizer, train_text: str, context_length: int) -> torch.Tensor:
    tokens = encode_text(tokenizer, train_text)
    if tokens.numel() < context_length + 1:
        raise InvalidInputError(
            f"contextLength {context_length} is longer than the corpus: the train split has "
            f"{tokens.numel()} tokens"
        )
    return tokens


@dataclass(frozen=True)
class EvalSet:
    """Tokens to evaluate on and the UTF-8 bytes of the text they cover. Every token but the
    first is predicted once."""

    tokens: torch.Tensor
    n_bytes: int

    @property
    def predicted_tokens(self) -> int:
        return max(0, self.tokens.numel() - 1)


def eval_set(tokenizer: Tokenizer, text: str, max_tokens: int | None = None) -> EvalSet:
    """The whole text, or its first `max_tokens` tokens. For such a prefix, the bytes are those
    of exactly the text the tokens spell (see `covered_bytes`)."""
    tokens = encode_text(tokenizer, text)
    if tokens.numel() < 2:
        raise InvalidInputError(
            f"the evaluation text has {tokens.numel()} token(s); at least 2 are needed"
        )
    if max_tokens is None or max_tokens >= tokens.numel():
        return EvalSet(tokens, len(text.encode("utf-8")))
    prefix = tokens[: max(2, max_tokens)]
    return EvalSet(prefix, covered_bytes(tokenizer, prefix))


def covered_bytes(tokenizer: Tokenizer, ids: torch.Tensor) -> int:
    """UTF-8 bytes of the text that `ids` spell. A byte-level vocabulary spells one byte per
    character of each token, which is exact even when a token ends inside a multi-byte
    character; other tokenizers are measured by decoding."""
    id_list = [int(i) for i in ids.tolist()]
    if isinstance(tokenizer.decoder, decoders.ByteLevel):
        added = tokenizer.get_added_tokens_decoder()
        total = 0
        for token_id in id_list:
            if token_id in added:
                total += len(added[token_id].content.encode("utf-8"))
            else:
                total += len(tokenizer.id_to_token(token_id) or "")
        return total
    return len(tokenizer.decode(id_list, skip_special_tokens=False).encode("utf-8"))


@dataclass(frozen=True)
class EvalBatch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    """Next-token targets; IGNORE_INDEX where the window is padded."""
    attention_mask: torch.Tensor | None
    """Set only when the batch holds padding."""


def eval_batches(
    tokens: torch.Tensor, context_length: int, batch_size: int, pad_id: int
) -> Iterator[EvalBatch]:
    """Non-overlapping windows: window i reads tokens [i*L, i*L+L) and predicts [i*L+1, i*L+L],
    so every token after the first is predicted exactly once. The last window is padded."""
    predicted = tokens.numel() - 1
    starts = list(range(0, predicted, context_length))
    for first in range(0, len(starts), batch_size):
        chunk = starts[first : first + batch_size]
        inputs = torch.full((len(chunk), context_length), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), context_length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(chunk), context_length), dtype=torch.long)
        for row, start in enumerate(chunk):
            length = min(context_length, predicted - start)
            inputs[row, :length] = tokens[start : start + length]
            labels[row, :length] = tokens[start + 1 : start + 1 + length]
            mask[row, :length] = 1
        padded = bool((mask == 0).any())
        yield EvalBatch(inputs, labels, mask if padded else None)
