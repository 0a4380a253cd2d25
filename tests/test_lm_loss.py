"""The chunked linear cross-entropy against transformers' own loss, and padding in evaluation."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from model_trainer.lm.data import IGNORE_INDEX
from model_trainer.lm.evaluate import LossTotals, evaluate_tokens, metrics_from
from model_trainer.lm.loss import linear_cross_entropy_sum

VOCAB = 97
PAD_ID = 96


def _model(context: int = 16) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=context,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=PAD_ID,
    )
    return GPT2LMHeadModel(config)


def _hf_loss_and_grads(
    model: GPT2LMHeadModel, inputs: torch.Tensor, targets: torch.Tensor
) -> tuple[float, dict[str, torch.Tensor]]:
    """transformers' loss: labels are shifted inside, so prepend one dummy column."""
    model.zero_grad(set_to_none=True)
    labels = torch.cat([torch.full_like(targets[:, :1], IGNORE_INDEX), targets[:, :-1]], dim=1)
    # The last target has no logit in transformers' shifted scheme; ignore it on both sides.
    loss = model(input_ids=inputs, labels=labels).loss
    assert isinstance(loss, torch.Tensor)
    torch.autograd.backward(loss)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


@pytest.mark.parametrize("chunk_rows", [7, 1024])
def test_matches_transformers_loss_and_gradients(chunk_rows: int) -> None:
    model = _model()
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, VOCAB, (3, 16), generator=generator)
    targets = torch.randint(0, VOCAB, (3, 16), generator=generator)
    targets[:, -1] = IGNORE_INDEX
    targets[1, 5:] = IGNORE_INDEX
    expected_loss, expected_grads = _hf_loss_and_grads(model, inputs, targets)

    model.zero_grad(set_to_none=True)
    hidden = model.transformer(input_ids=inputs).last_hidden_state
    total = linear_cross_entropy_sum(hidden, model.lm_head.weight, targets, chunk_rows=chunk_rows)
    count = int((targets != IGNORE_INDEX).sum())
    torch.autograd.backward(total / count)

    assert total.item() / count == pytest.approx(expected_loss, rel=1e-6)
    for name, param in model.named_parameters():
        assert param.grad is not None
        torch.testing.assert_close(param.grad, expected_grads[name], rtol=1e-4, atol=1e-6)


def test_bf16_compute_stays_close_to_fp32() -> None:
    model = _model()
    inputs = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    targets = torch.roll(inputs, -1, dims=1)
    hidden = model.transformer(input_ids=inputs).last_hidden_state
    fp32 = linear_cross_entropy_sum(hidden, model.lm_head.weight, targets)
    bf16 = linear_cross_entropy_sum(hidden, model.lm_head.weight, targets, torch.bfloat16)
    assert bf16.dtype == torch.float32
    assert bf16.item() == pytest.approx(fp32.item(), rel=1e-2)


def test_without_grad_gives_the_same_sum() -> None:
    model = _model()
    inputs = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    targets = torch.roll(inputs, -1, dims=1)
    hidden = model.transformer(input_ids=inputs).last_hidden_state
    with_grad = linear_cross_entropy_sum(hidden, model.lm_head.weight, targets)
    with torch.no_grad():
        without = linear_cross_entropy_sum(hidden, model.lm_head.weight, targets)
    assert with_grad.item() == pytest.approx(without.item(), rel=1e-6)


def test_padding_never_counts_in_evaluation() -> None:
    """26 tokens in windows of 16: the second window is padded. Its loss must equal the loss of
    the same tokens evaluated unpadded, so neither pad inputs nor pad labels leak in."""
    model = _model(context=16)
    tokens = torch.randint(0, PAD_ID, (26,), generator=torch.Generator().manual_seed(4))
    totals = evaluate_tokens(model, tokens, batch_size=4, pad_id=PAD_ID, device=torch.device("cpu"))
    assert totals.tokens == 25

    expected = 0.0
    with torch.no_grad():
        for start in (0, 16):
            window = tokens[start : start + 17][None, :]
            logits = model(input_ids=window[:, :-1]).logits
            expected += float(
                torch.nn.functional.cross_entropy(logits[0], window[0, 1:], reduction="sum")
            )
    assert totals.nats == pytest.approx(expected, rel=1e-5)

    other_pad = evaluate_tokens(model, tokens, batch_size=4, pad_id=3, device=torch.device("cpu"))
    assert other_pad.nats == pytest.approx(totals.nats, rel=1e-6)
    assert model.training  # evaluation restores the mode it found


def test_metrics_from_totals() -> None:
    metrics = metrics_from(LossTotals(nats=200.0, tokens=100), n_bytes=400, step=7)
    assert metrics.loss == pytest.approx(2.0)
    assert metrics.perplexity == pytest.approx(7.389056, rel=1e-6)
    assert metrics.bits_per_byte == pytest.approx(200.0 / 400 / 0.6931471805599453)
    assert (metrics.tokens, metrics.step) == (100, 7)
