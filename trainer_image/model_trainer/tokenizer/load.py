"""Load a trained tokenizer and find its special tokens."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from model_trainer.errors import TokenizerNotFoundError


@dataclass(frozen=True)
class SpecialTokenIds:
    """Ids of the special tokens: end-of-text is the first of the spec's specialTokens, padding
    the second; the unknown token is the model's own (None for byte-level bpe)."""

    eos: int | None
    pad: int | None
    unk: int | None


def load_tokenizer(path: Path) -> Tokenizer:
    """Read a tokenizer.json written by `train_tokenizer`."""
    if not path.is_file():
        raise TokenizerNotFoundError(f"tokenizer file {path} does not exist")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises plain Exception for unreadable or invalid JSON
        raise TokenizerNotFoundError(f"tokenizer file {path} cannot be loaded: {exc}") from None


def special_token_ids(tokenizer: Tokenizer) -> SpecialTokenIds:
    unk = _unk_id(tokenizer)
    specials = sorted(
        token_id
        for token_id, added in tokenizer.get_added_tokens_decoder().items()
        if added.special and token_id != unk
    )
    return SpecialTokenIds(
        eos=specials[0] if specials else None,
        pad=specials[1] if len(specials) > 1 else None,
        unk=unk,
    )


def _unk_id(tokenizer: Tokenizer) -> int | None:
    data = json.loads(tokenizer.to_str())
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        return None
    unk_id = model.get("unk_id")
    if isinstance(unk_id, int):
        return unk_id
    unk_token = model.get("unk_token")
    if isinstance(unk_token, str):
        return tokenizer.token_to_id(unk_token)
    return None
