"""Throughput and quality of our training loop against a naive one, in one run on one machine.

Reference config: GPT-2 with 4 layers, 4 heads, 256 wide, context 256, vocabulary 8192 (a real
byte-level BPE trained here on tinyshakespeare), batch 8.

- naive: plain GPT2LMHeadModel (default config) in fp32, the loss from `labels=`, AdamW.
- ours:  model_trainer.lm's StepRunner (precision and compilation as `auto` picks them).

Both start from the same weights, see the same batches and use the same AdamW settings,
learning-rate schedule and gradient clipping, so only the loop differs. Their steps are
interleaved in blocks so that a noisy shared machine slows both alike. After the same number of
tokens both are evaluated on the same holdout (fp32, non-overlapping windows).

    uv run --no-sync python bench/bench_training.py [--steps N]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import JsonValue
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel

from model_trainer import artifacts, log
from model_trainer.api import ModelSpec, TrainingSpec
from model_trainer.corpus import split_holdout
from model_trainer.lm.data import WindowSampler, encode_text
from model_trainer.lm.device import (
    Runtime,
    c_compiler,
    choose_compile,
    cpu_flags,
    detect_runtime,
)
from model_trainer.lm.evaluate import evaluate_tokens
from model_trainer.lm.model import build_config, special_tokens
from model_trainer.lm.optim import ADAM_BETAS, ADAM_EPS, build_optimizer, parameter_groups
from model_trainer.lm.schedule import learning_rate_at
from model_trainer.lm.step import StepRunner

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared/data/tinyshakespeare.txt"
RESULTS = ROOT / "bench/results/training.json"
CACHE = Path(tempfile.gettempdir()) / "model-trainer-bench"
VOCAB_SIZE = 8192
BATCH_SIZE = 8
HOLDOUT_FRACTION = 0.05
SEED = 0
WARMUP_STEPS_UNTIMED = 3
BLOCK_STEPS = 10
TARGET_SPEEDUP = 3.0
TARGET_LOSS_DIFF = 0.02

logger = log.get_logger("bench.training")


def train_tokenizer(text: str) -> Tokenizer:
    path = CACHE / f"tokenizer-{VOCAB_SIZE}-{artifacts.sha256_bytes(text.encode())[:12]}.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(text.splitlines(keepends=True), trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return tokenizer


@dataclass
class Contender:
    name: str
    step: Callable[[int], float]
    model: GPT2LMHeadModel
    seconds: list[float]
    losses: list[float]


def naive_contender(config: GPT2Config, training: TrainingSpec, tokens: torch.Tensor) -> Contender:
    torch.manual_seed(SEED)
    model = GPT2LMHeadModel(config)
    model.train()
    optimizer = torch.optim.AdamW(
        parameter_groups(model, training.weight_decay),
        lr=training.learning_rate,
        betas=ADAM_BETAS,
        eps=ADAM_EPS,
    )
    sampler = WindowSampler(tokens, config.n_positions + 1, SEED)

    def step(index: int) -> float:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(index, training)
        inputs, targets = sampler.batch(training.batch_size)
        # transformers shifts labels itself: labels = the window without its last token.
        labels = torch.cat([inputs[:, :1], targets[:, :-1]], dim=1)
        loss = model(input_ids=inputs, labels=labels).loss
        assert isinstance(loss, torch.Tensor)
        torch.autograd.backward(loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), training.grad_clip)
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    return Contender("naive", step, model, [], [])


def our_contender(
    config: GPT2Config, training: TrainingSpec, tokens: torch.Tensor, runtime: Runtime
) -> tuple[Contender, bool]:
    torch.manual_seed(SEED)
    model = GPT2LMHeadModel(config)
    model.train()
    optimizer = build_optimizer(model, training)
    sampler = WindowSampler(tokens, config.n_positions + 1, SEED)
    compile_choice = choose_compile(training.max_steps, runtime.device.type, compiler=c_compiler())
    runner = StepRunner(
        model, optimizer, sampler, training, runtime, compile=compile_choice.enabled
    )

    def step(index: int) -> float:
        loss = runner.step(index, lambda: False)
        assert loss is not None
        return loss

    return Contender("ours", step, model, [], []), runner.compiled


def run_interleaved(contenders: list[Contender], steps: int) -> None:
    for start in range(0, steps, BLOCK_STEPS):
        for contender in contenders:
            for index in range(start, min(steps, start + BLOCK_STEPS)):
                began = time.perf_counter()
                contender.losses.append(contender.step(index))
                contender.seconds.append(time.perf_counter() - began)
        logger.info(
            "bench_progress",
            step=min(steps, start + BLOCK_STEPS),
            total_steps=steps,
            **{c.name + "_loss": round(c.losses[-1], 4) for c in contenders},
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps of each loop")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    args = parser.parse_args()
    log.configure()
    started = time.perf_counter()

    text = CORPUS.read_text(encoding="utf-8")
    split = split_holdout(text, HOLDOUT_FRACTION)
    tokenizer = train_tokenizer(split.train)
    train_tokens = encode_text(tokenizer, split.train)
    holdout_tokens = encode_text(tokenizer, split.holdout)
    logger.info(
        "bench_data",
        vocab=tokenizer.get_vocab_size(),
        train_tokens=train_tokens.numel(),
        holdout_tokens=holdout_tokens.numel(),
        setup_seconds=round(time.perf_counter() - started, 1),
    )

    spec = ModelSpec(n_layer=4, n_head=4, n_embd=256, context_length=256)
    training = TrainingSpec(
        max_steps=args.steps,
        batch_size=BATCH_SIZE,
        learning_rate=args.learning_rate,
        warmup_steps=min(20, args.steps),
        seed=SEED,
    )
    runtime = detect_runtime("auto")
    ours_config = build_config(spec, tokenizer)
    naive_config = GPT2Config(
        vocab_size=ours_config.vocab_size,
        n_positions=spec.context_length,
        n_embd=spec.n_embd,
        n_layer=spec.n_layer,
        n_head=spec.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=ours_config.bos_token_id,
        eos_token_id=ours_config.eos_token_id,
        pad_token_id=ours_config.pad_token_id,
    )
    naive = naive_contender(naive_config, training, train_tokens)
    ours, compiled = our_contender(ours_config, training, train_tokens, runtime)
    run_interleaved([naive, ours], args.steps)

    tokens_per_step = BATCH_SIZE * spec.context_length
    pad_id = special_tokens(tokenizer).pad_id
    results: dict[str, dict[str, float]] = {}
    for contender in (naive, ours):
        timed = contender.seconds[WARMUP_STEPS_UNTIMED:]
        totals = evaluate_tokens(
            contender.model,
            holdout_tokens,
            batch_size=BATCH_SIZE,
            pad_id=pad_id,
            device=runtime.device,
        )
        results[contender.name] = {
            "tokens_per_second": tokens_per_step * len(timed) / sum(timed),
            "median_step_ms": 1000 * statistics.median(timed),
            "first_step_seconds": contender.seconds[0],
            "final_train_loss": statistics.fmean(contender.losses[-10:]),
            "holdout_loss": totals.nats / totals.tokens,
        }
    speedup = results["ours"]["tokens_per_second"] / results["naive"]["tokens_per_second"]
    median_speedup = results["naive"]["median_step_ms"] / results["ours"]["median_step_ms"]
    loss_diff = (results["ours"]["holdout_loss"] - results["naive"]["holdout_loss"]) / results[
        "naive"
    ]["holdout_loss"]
    summary = {
        "config": {
            "n_layer": 4,
            "n_head": 4,
            "n_embd": 256,
            "context_length": 256,
            "vocab_size": ours_config.vocab_size,
            "batch_size": BATCH_SIZE,
            "steps": args.steps,
            "learning_rate": args.learning_rate,
            "tokens_per_loop": args.steps * tokens_per_step,
            "holdout_tokens": holdout_tokens.numel(),
        },
        "ours": {**results["ours"], "precision": runtime.precision, "compiled": compiled},
        "naive": {**results["naive"], "precision": "fp32", "compiled": False},
        "speedup": speedup,
        "median_step_speedup": median_speedup,
        "holdout_loss_relative_diff": loss_diff,
        "targets": {
            "speedup": TARGET_SPEEDUP,
            "holdout_loss_relative_diff": TARGET_LOSS_DIFF,
            "speedup_met": speedup >= TARGET_SPEEDUP,
            "loss_met": abs(loss_diff) <= TARGET_LOSS_DIFF,
        },
        "machine": {
            "platform": platform.platform(),
            "threads": runtime.threads,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "avx512_bf16": "avx512_bf16" in cpu_flags(_cpuinfo()),
            "torch": torch.__version__,
        },
        "wall_seconds": time.perf_counter() - started,
    }
    artifacts.atomic_write_json(RESULTS, _rounded(summary))
    logger.info(
        "bench_training",
        speedup=round(speedup, 3),
        median_step_speedup=round(median_speedup, 3),
        ours_tokens_per_second=round(results["ours"]["tokens_per_second"], 1),
        naive_tokens_per_second=round(results["naive"]["tokens_per_second"], 1),
        ours_holdout_loss=round(results["ours"]["holdout_loss"], 4),
        naive_holdout_loss=round(results["naive"]["holdout_loss"], 4),
        holdout_loss_relative_diff=round(loss_diff, 4),
        results=str(RESULTS),
    )


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return ""


def _rounded(value: object) -> JsonValue:
    if isinstance(value, float):
        return round(value, 5)
    if isinstance(value, dict):
        return {str(k): _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    if value is None or isinstance(value, str | int | bool):
        return value
    return str(value)


if __name__ == "__main__":
    main()
