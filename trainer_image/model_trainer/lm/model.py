"""The tokenizer file and the GPT-2 model built from a ModelSpec."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from model_trainer.api.training_run import ModelSpec
from model_trainer.errors import InvalidInputError
from model_trainer.tokenizer.load import special_token_ids


@dataclass(frozen=True)
class SpecialTokens:
    """By convention the tokenizer's first special token ends a text, its second pads."""

    eos_id: int
    pad_id: int


def special_tokens(tokenizer: Tokenizer) -> SpecialTokens:
    ids = special_token_ids(tokenizer)
    if ids.eos is None:
        raise InvalidInputError(
            "tokenizer has no special tokens; its first special token must be end-of-text"
        )
    # Without a padding token, padded positions reuse end-of-text; they never count in the loss.
    return SpecialTokens(eos_id=ids.eos, pad_id=ids.pad if ids.pad is not None else ids.eos)


def vocab_size(tokenizer: Tokenizer) -> int:
    return tokenizer.get_vocab_size(with_added_tokens=True)


def build_config(spec: ModelSpec, tokenizer: Tokenizer) -> GPT2Config:
    special = special_tokens(tokenizer)
    return GPT2Config(
        vocab_size=vocab_size(tokenizer),
        n_positions=spec.context_length,
        n_embd=spec.n_embd,
        n_layer=spec.n_layer,
        n_head=spec.n_head,
        resid_pdrop=spec.dropout,
        embd_pdrop=spec.dropout,
        attn_pdrop=spec.dropout,
        bos_token_id=special.eos_id,
        eos_token_id=special.eos_id,
        pad_token_id=special.pad_id,
        tie_word_embeddings=True,
        # GPT-2's tanh-approximated GELU as one fused kernel; "gelu_new" computes the same
        # formula in five separate element-wise ops.
        activation_function="gelu_pytorch_tanh",
    )


def build_model(config: GPT2Config, seed: int) -> GPT2LMHeadModel:
    """A freshly initialised model; the same seed gives the same weights."""
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def context_length(model: GPT2LMHeadModel) -> int:
    n_positions = model.config.n_positions
    if not isinstance(n_positions, int):
        raise InvalidInputError("model config has no integer n_positions")
    return n_positions


def move_to(model: nn.Module, device: torch.device) -> None:
    """Move parameters in place (transformers' own `to` wrapper is untyped)."""
    nn.Module.to(model, device)
