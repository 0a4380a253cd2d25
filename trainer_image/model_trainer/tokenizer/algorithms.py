"""Build and train a `tokenizers.Tokenizer` for each algorithm, with byte-stable output.

The trainers of `tokenizers` use no random numbers, but Rust hash maps with per-process seeds
leak into two places, so the same input would not give the same tokenizer.json:

- WordPiece gives the continuation tokens ("##e") ids in hash order, and ties between equally
  frequent merges are broken by id, so the vocabulary itself can differ at the cut-off. We give
  those tokens fixed, sorted ids by handing them to the trainer with the special tokens, then
  rebuild the model so that they are ordinary vocabulary.
- Unigram sums floats in hash order, so scores differ in their last bits, and it gives the
  characters that pruning dropped the scores min + k * 1e-4 with k in hash order. We give those
  characters their penalties in sorted order, round every score and order the pieces by
  (score, piece).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from model_trainer.api.tokenizer_job import TokenizerJobSpec
from model_trainer.errors import InvalidInputError

CHUNK_CHARS = 16 * 1024
"""Training text goes to the trainer in line-aligned chunks of about this size: measurably
faster than single lines, whole text or `Tokenizer.train` on files."""
WORDPIECE_PREFIX = "##"
UNIGRAM_SCORE_DECIMALS = 6
UNIGRAM_PENALTY_STEP = 1e-4
"""Step between the scores that tokenizers' UnigramTrainer gives to re-added characters."""


def text_chunks(text: str, size: int = CHUNK_CHARS) -> Iterator[str]:
    """`text` in pieces of at least `size` characters that end at a line boundary."""
    start = 0
    while start < len(text):
        newline = text.find("\n", start + size)
        end = len(text) if newline < 0 else newline + 1
        yield text[start:end]
        start = end


def unk_token_of(spec: TokenizerJobSpec) -> str | None:
    """The unknown token, or None for byte-level bpe, where every input is representable."""
    return None if spec.algorithm == "bpe" else spec.unk_token


def special_tokens_of(spec: TokenizerJobSpec) -> list[str]:
    """Special tokens in id order: the spec's, then the unknown token if the algorithm has one."""
    unk = unk_token_of(spec)
    if unk is None or unk in spec.special_tokens:
        return list(spec.special_tokens)
    return [*spec.special_tokens, unk]


def train_model(spec: TokenizerJobSpec, train_text: str) -> Tokenizer:
    if spec.algorithm == "bpe":
        return _train_bpe(spec, train_text)
    if spec.algorithm == "unigram":
        return _train_unigram(spec, train_text)
    return _train_wordpiece(spec, train_text)


def _train_bpe(spec: TokenizerJobSpec, train_text: str) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        min_frequency=spec.min_frequency,
        show_progress=False,
        special_tokens=special_tokens_of(spec),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(text_chunks(train_text), trainer)
    return tokenizer


def _unigram_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Newlines are pieces of their own, so no token spans two lines; with no prepended "▁"
    # decoding gives back the input exactly.
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Metaspace(prepend_scheme="never"),
        ]
    )


def _train_unigram(spec: TokenizerJobSpec, train_text: str) -> Tokenizer:
    specials = special_tokens_of(spec)
    alphabet = set(train_text.replace(" ", "▁"))
    _require_room(spec, len(specials) + len(alphabet), f"{len(alphabet)} distinct characters")
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = _unigram_pre_tokenizer()
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="never")
    trainer = trainers.UnigramTrainer(
        vocab_size=spec.vocab_size,
        show_progress=False,
        special_tokens=specials,
        unk_token=spec.unk_token,
    )
    tokenizer.train_from_iterator(text_chunks(train_text), trainer)
    return _canonical_unigram(tokenizer, specials, spec.unk_token)


def _canonical_unigram(trained: Tokenizer, specials: list[str], unk_token: str) -> Tokenizer:
    data = json.loads(trained.to_str())
    model = data.get("model") if isinstance(data, dict) else None
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if not isinstance(vocab, list):
        raise TypeError("trained unigram tokenizer has no vocabulary list")
    pieces: list[tuple[str, float]] = []
    for entry in vocab:
        if not (isinstance(entry, list) and len(entry) == 2):
            raise TypeError(f"unexpected unigram vocabulary entry {entry!r}")
        piece, score = entry
        if not isinstance(piece, str) or not isinstance(score, int | float):
            raise TypeError(f"unexpected unigram vocabulary entry {entry!r}")
        pieces.append((piece, float(score)))
    special_set = set(specials)
    learned = _sorted_penalties([p for p in pieces if p[0] not in special_set])
    ordered = [(s, 0.0) for s in specials]
    ordered += sorted(
        ((piece, round(score, UNIGRAM_SCORE_DECIMALS)) for piece, score in learned),
        key=lambda p: (-p[1], p[0]),
    )
    tokenizer = Tokenizer(
        models.Unigram(vocab=ordered, unk_id=specials.index(unk_token), byte_fallback=False)
    )
    tokenizer.pre_tokenizer = _unigram_pre_tokenizer()
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="never")
    tokenizer.add_special_tokens(specials)
    return tokenizer


def _sorted_penalties(pieces: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """Give the re-added characters, single characters at the lowest score plus 0, 1, 2, ...
    penalty steps, those scores in character order rather than in hash order."""
    if not pieces:
        return pieces
    floor = min(score for _, score in pieces)
    by_step: dict[int, list[str]] = {}
    for piece, score in pieces:
        steps = (score - floor) / UNIGRAM_PENALTY_STEP
        if len(piece) == 1 and abs(steps - round(steps)) < 1e-5:
            by_step.setdefault(round(steps), []).append(piece)
    chars: list[str] = []
    step = 0
    while step in by_step:
        chars += by_step[step]
        step += 1
    scores = {c: floor + k * UNIGRAM_PENALTY_STEP for k, c in enumerate(sorted(chars))}
    return [(piece, scores.get(piece, score)) for piece, score in pieces]


def _train_wordpiece(spec: TokenizerJobSpec, train_text: str) -> Tokenizer:
    specials = special_tokens_of(spec)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words: set[str] = set()
    for chunk in text_chunks(train_text):
        words.update(word for word, _ in pre_tokenizer.pre_tokenize_str(chunk))
    initials = {c for word in words for c in word}
    continuation_tokens = sorted({WORDPIECE_PREFIX + c for word in words for c in word[1:]})
    _require_room(
        spec,
        len(specials) + len(initials) + len(continuation_tokens),
        f"{len(initials)} distinct characters and {len(continuation_tokens)} word-continuing ones",
    )
    tokenizer = Tokenizer(models.WordPiece(unk_token=spec.unk_token))
    tokenizer.pre_tokenizer = pre_tokenizer
    trainer = trainers.WordPieceTrainer(
        vocab_size=spec.vocab_size,
        min_frequency=spec.min_frequency,
        show_progress=False,
        special_tokens=specials + [t for t in continuation_tokens if t not in specials],
        continuing_subword_prefix=WORDPIECE_PREFIX,
    )
    tokenizer.train_from_iterator(text_chunks(train_text), trainer)
    vocab = tokenizer.get_vocab(with_added_tokens=False)
    rebuilt = Tokenizer(
        models.WordPiece(
            vocab=vocab, unk_token=spec.unk_token, continuing_subword_prefix=WORDPIECE_PREFIX
        )
    )
    rebuilt.pre_tokenizer = pre_tokenizer
    rebuilt.decoder = decoders.WordPiece(prefix=WORDPIECE_PREFIX)
    rebuilt.add_special_tokens(specials)
    return rebuilt


def _require_room(spec: TokenizerJobSpec, needed: int, what: str) -> None:
    if spec.vocab_size < needed:
        raise InvalidInputError(
            f"vocabSize {spec.vocab_size} is too small for a {spec.algorithm} tokenizer of this "
            f"corpus: its training split has {what}, so at least {needed} tokens (special "
            f"tokens included) are needed"
        )
