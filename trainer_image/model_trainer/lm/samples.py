"""Deterministic text samples: top-k sampling with a seeded generator per prompt."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer
from transformers import GPT2LMHeadModel

from model_trainer.lm.model import context_length

TOP_K = 40


@dataclass(frozen=True)
class Sample:
    prompt: str
    completion: str


def generate(
    model: GPT2LMHeadModel,
    tokenizer: Tokenizer,
    prompt: str,
    *,
    max_new_tokens: int,
    eos_id: int,
    seed: int,
    device: torch.device,
) -> Sample:
    """Continue `prompt` by up to `max_new_tokens` tokens, stopping at end-of-text. The same
    model, prompt and seed always give the same completion."""
    generator = torch.Generator(device=device).manual_seed(seed)
    window = context_length(model)
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids or [eos_id]
    sequence = torch.tensor([ids], dtype=torch.long, device=device)
    new_ids: list[int] = []
    was_training = model.training
    model.train(False)
    try:
        with torch.no_grad():
            for _ in range(max_new_tokens):
                hidden = model.transformer(input_ids=sequence[:, -window:]).last_hidden_state
                logits = model.lm_head(hidden[:, -1, :]).float()
                top = torch.topk(logits, min(TOP_K, logits.shape[-1]), dim=-1)
                probs = torch.softmax(top.values, dim=-1)
                choice = torch.multinomial(probs, 1, generator=generator)
                next_id = int(top.indices.gather(-1, choice).item())
                if next_id == eos_id:
                    break
                new_ids.append(next_id)
                sequence = torch.cat([sequence, choice.new_tensor([[next_id]])], dim=1)
    finally:
        model.train(was_training)
    return Sample(prompt=prompt, completion=tokenizer.decode(new_ids, skip_special_tokens=True))


def generate_samples(
    model: GPT2LMHeadModel,
    tokenizer: Tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    eos_id: int,
    seed: int,
    device: torch.device,
) -> list[Sample]:
    return [
        generate(
            model,
            tokenizer,
            prompt,
            max_new_tokens=max_new_tokens,
            eos_id=eos_id,
            seed=seed + index,
            device=device,
        )
        for index, prompt in enumerate(prompts)
    ]
