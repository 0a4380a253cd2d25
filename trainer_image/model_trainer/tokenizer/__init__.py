"""Tokenizer training (byte-level BPE, unigram, wordpiece) and loading."""

from model_trainer.artifacts import TOKENIZER_FILE
from model_trainer.tokenizer.load import SpecialTokenIds, load_tokenizer, special_token_ids
from model_trainer.tokenizer.train import TokenizerResult, train_tokenizer

__all__ = [
    "TOKENIZER_FILE",
    "SpecialTokenIds",
    "TokenizerResult",
    "load_tokenizer",
    "special_token_ids",
    "train_tokenizer",
]
