"""Token streams, windows, evaluation batches, learning-rate schedule and weight decay groups."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from tokenizers.pre_tokenizers import ByteLevel
from transformers import GPT2Config, GPT2LMHeadModel

from lm_support import build_tokenizer, corpus_text
from model_trainer.api import TrainingSpec
from model_trainer.errors import InvalidInputError
from model_trainer.lm.data import (
    IGNORE_INDEX,
    WindowSampler,
    covered_bytes,
    encode_text,
    eval_batches,
    eval_set,
    split_for_encoding,
    train_stream,
)
from model_trainer.lm.optim import parameter_groups
from model_trainer.lm.schedule import learning_rate_at


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path = build_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json", corpus_text())
    return Tokenizer.from_file(str(path))


def test_encoding_in_pieces_equals_encoding_the_whole_text(tokenizer: Tokenizer) -> None:
    text = corpus_text() + "\n\n  indented\n\n\nafter blank lines\n"
    pieces = split_for_encoding(text, chunk_chars=500)
    assert len(pieces) > 20
    assert "".join(pieces) == text
    for piece in pieces[:-1]:
        assert piece.endswith("\n")
    whole = tokenizer.encode(text, add_special_tokens=False).ids
    # encode_text uses its own (large) chunk size; check both chunkings against the whole.
    pieced = [i for p in pieces for i in tokenizer.encode(p, add_special_tokens=False).ids]
    assert pieced == whole
    assert encode_text(tokenizer, text).tolist() == whole
    assert encode_text(tokenizer, text).dtype == torch.int32


def test_windows_are_contiguous_slices_drawn_reproducibly() -> None:
    tokens = torch.arange(1000, dtype=torch.int32)
    first = WindowSampler(tokens, window=17, seed=3)
    inputs, targets = first.batch(6)
    assert inputs.shape == targets.shape == (6, 16)
    assert inputs.dtype == torch.long
    assert torch.equal(targets, inputs + 1)  # targets are the inputs shifted by one token
    assert torch.equal(inputs[:, 1:] - inputs[:, :-1], torch.ones(6, 15, dtype=torch.long))
    second = WindowSampler(tokens, window=17, seed=3)
    assert torch.equal(second.batch(6)[0], inputs)
    assert not torch.equal(WindowSampler(tokens, window=17, seed=4).batch(6)[0], inputs)
    exact = WindowSampler(torch.arange(17, dtype=torch.int32), window=17, seed=0)
    assert exact.batch(2)[0][0].tolist() == list(range(16))


def test_train_split_shorter_than_a_window_is_invalid_input(tokenizer: Tokenizer) -> None:
    text = "To be, or not to be.\n"
    n_tokens = len(tokenizer.encode(text, add_special_tokens=False).ids)
    assert train_stream(tokenizer, text, n_tokens - 1).numel() == n_tokens
    with pytest.raises(InvalidInputError) as caught:
        train_stream(tokenizer, text, n_tokens)
    assert caught.value.message == (
        f"contextLength {n_tokens} is longer than the corpus: the train split has {n_tokens} tokens"
    )


def test_eval_windows_predict_every_token_once_and_pad_the_last() -> None:
    tokens = torch.arange(100, 123)  # 23 tokens: 22 predictions in windows of 8 -> 8, 8, 6
    batches = list(eval_batches(tokens, context_length=8, batch_size=2, pad_id=999))
    assert [b.input_ids.shape[0] for b in batches] == [2, 1]
    labels = torch.cat([b.labels for b in batches])
    inputs = torch.cat([b.input_ids for b in batches])
    assert labels[labels != IGNORE_INDEX].tolist() == list(range(101, 123))
    assert inputs[labels != IGNORE_INDEX].tolist() == list(range(100, 122))
    assert batches[0].attention_mask is None
    last = batches[1]
    assert last.input_ids[0].tolist() == [116, 117, 118, 119, 120, 121, 999, 999]
    assert last.labels[0].tolist() == [117, 118, 119, 120, 121, 122, IGNORE_INDEX, IGNORE_INDEX]
    assert last.attention_mask is not None
    assert last.attention_mask[0].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]


def test_eval_set_bytes(tokenizer: Tokenizer) -> None:
    text = "Café ☃ naïve\nROMEO: 日本語 and more text here\n"
    whole = eval_set(tokenizer, text)
    assert whole.n_bytes == len(text.encode("utf-8"))
    assert whole.predicted_tokens == whole.tokens.numel() - 1
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    # A byte-level vocabulary spells exactly the text's bytes, whole or in prefixes.
    assert covered_bytes(tokenizer, torch.tensor(ids)) == len(text.encode("utf-8"))
    for n in range(2, len(ids)):
        prefix = eval_set(tokenizer, text, max_tokens=n)
        assert prefix.tokens.tolist() == ids[:n]
        spelled = b"".join(_token_bytes(tokenizer, i) for i in ids[:n])
        assert text.encode("utf-8").startswith(spelled)
        assert prefix.n_bytes == len(spelled)
    with pytest.raises(InvalidInputError, match="at least 2"):
        eval_set(tokenizer, "a")


def _token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    byte_of = {ch: b for b, ch in enumerate(_byte_level_chars(ByteLevel.alphabet()))}
    token = tokenizer.id_to_token(token_id)
    assert token is not None
    return bytes(byte_of[ch] for ch in token)


def _byte_level_chars(alphabet: list[str]) -> list[str]:
    """The GPT-2 byte-to-unicode table, in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars: list[str] = []
    extra = 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    assert set(chars) == set(alphabet)
    return chars


def test_covered_bytes_of_a_non_byte_level_tokenizer_decodes() -> None:
    word_level = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]"])
    word_level.train_from_iterator(["ab cd ef"], trainer)
    ids = word_level.encode("ab cd").ids
    assert covered_bytes(word_level, torch.tensor(ids)) == len(word_level.decode(ids).encode())


def _spec(**overrides: float) -> TrainingSpec:
    values: dict[str, float] = {
        "max_steps": 100,
        "warmup_steps": 10,
        "learning_rate": 1e-3,
        "min_learning_rate_ratio": 0.1,
    }
    values.update(overrides)
    return TrainingSpec.model_validate(values)


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_the_floor() -> None:
    spec = _spec()
    lrs = [learning_rate_at(s, spec) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4)
    assert lrs[4] == pytest.approx(5e-4)
    assert lrs[9] == pytest.approx(1e-3)
    assert lrs[10] == pytest.approx(1e-3)
    assert lrs[99] == pytest.approx(1e-4)
    decay = lrs[10:]
    assert all(a >= b for a, b in itertools.pairwise(decay))
    midpoint = 10 + (100 - 10 - 1) / 2
    assert learning_rate_at(math.floor(midpoint), spec) == pytest.approx(5.5e-4, rel=0.02)
    no_warmup = _spec(warmup_steps=0)
    assert learning_rate_at(0, no_warmup) == pytest.approx(1e-3)
    assert learning_rate_at(5, _spec(max_steps=5, warmup_steps=5)) == pytest.approx(1e-3)


def test_weight_decay_applies_to_matrices_only() -> None:
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=50,
            n_positions=8,
            n_embd=16,
            n_layer=1,
            n_head=2,
            bos_token_id=0,
            eos_token_id=0,
        )
    )
    decay, no_decay = parameter_groups(model, 0.1)
    decayed = decay["params"]
    undecayed = no_decay["params"]
    assert isinstance(decayed, list)
    assert isinstance(undecayed, list)
    assert decay["weight_decay"] == 0.1
    assert no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decayed) and all(p.ndim == 1 for p in undecayed)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in undecayed} >= {
        "transformer.ln_f.weight",
        "transformer.ln_f.bias",
        "transformer.h.0.attn.c_attn.bias",
    }
    assert "transformer.wte.weight" in {names[id(p)] for p in decayed}
    assert len(decayed) + len(undecayed) == len(list(model.parameters()))
