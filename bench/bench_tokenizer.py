"""Tokenizer training throughput: `train_tokenizer` against plain `tokenizers` byte-level BPE.

    uv run --no-sync python bench/bench_tokenizer.py [--corpus PATH] [--vocab-size 8192]

Both sides train on the same train split (the spec's default holdout is cut off first) with the
same settings; each is timed three times (--repetitions), interleaved, and the best time
counts. The other load on the machine is recorded, since it moves the figures. The result is
logged as JSON and written to bench/results/tokenizer.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import tokenizers
from pydantic import JsonValue
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from model_trainer import log
from model_trainer.api import TokenizerJob
from model_trainer.api.tokenizer_job import TokenizerJobSpec
from model_trainer.artifacts import atomic_write_json
from model_trainer.corpus import CorpusContext, split_holdout
from model_trainer.reporting import NullReporter
from model_trainer.tokenizer import load_tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
RESULT_PATH = ROOT / "bench" / "results" / "tokenizer.json"
REPETITIONS = 3
DEFAULT_COPIES = 4
TARGET_RATIO = 0.9

logger = log.get_logger("bench.tokenizer")


def _raw_tokenizer(spec: TokenizerJobSpec) -> tuple[Tokenizer, trainers.BpeTrainer]:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        min_frequency=spec.min_frequency,
        show_progress=False,
        special_tokens=list(spec.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    return tokenizer, trainer


def _timed(train: Callable[[], Tokenizer]) -> tuple[float, Tokenizer]:
    started = time.perf_counter()
    tokenizer = train()
    return time.perf_counter() - started, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description="Tokenizer training throughput benchmark")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--repetitions", type=int, default=REPETITIONS)
    parser.add_argument(
        "--copies",
        type=int,
        default=DEFAULT_COPIES,
        help="train on this many concatenated copies of the corpus, so that one timing lasts "
        "long enough to rise above scheduling noise",
    )
    args = parser.parse_args()
    log.configure()
    corpus_path: Path = args.corpus.resolve()
    if not corpus_path.is_file():
        parser.error(f"corpus {corpus_path} does not exist")

    text = corpus_path.read_text(encoding="utf-8") * max(1, args.copies)
    scratch = Path(tempfile.mkdtemp(prefix="bench-tokenizer-corpus-"))
    bench_corpus = scratch / "corpus.txt"
    bench_corpus.write_text(text, encoding="utf-8")
    job = TokenizerJob.model_validate(
        {
            "metadata": {"name": "bench"},
            "spec": {"vocabSize": args.vocab_size, "corpus": {"path": str(bench_corpus)}},
        }
    )
    spec = job.spec
    train_text = split_holdout(text, spec.holdout_fraction).train
    train_bytes = len(train_text.encode("utf-8"))

    ours_train: list[float] = []
    ours_total: list[float] = []
    raw: dict[str, list[float]] = {"files": [], "iterator_lines": []}
    vocabs: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-tokenizer-") as tmp:
        work = Path(tmp)
        train_file = work / "train.txt"
        train_file.write_text(train_text, encoding="utf-8")
        ctx = CorpusContext(artifacts_root=work)

        def raw_files() -> Tokenizer:
            tokenizer, trainer = _raw_tokenizer(spec)
            tokenizer.train([str(train_file)], trainer)
            return tokenizer

        def raw_lines() -> Tokenizer:
            tokenizer, trainer = _raw_tokenizer(spec)
            tokenizer.train_from_iterator(train_text.splitlines(keepends=True), trainer)
            return tokenizer

        for rep in range(args.repetitions):
            result = train_tokenizer(job, work / f"ours-{rep}", ctx, NullReporter())
            ours_train.append(result.train_seconds)
            ours_total.append(result.duration_seconds)
            vocabs["ours"] = load_tokenizer(result.tokenizer_path).get_vocab()
            for name, train in (("files", raw_files), ("iterator_lines", raw_lines)):
                seconds, tokenizer = _timed(train)
                raw[name].append(seconds)
                vocabs[name] = tokenizer.get_vocab()

    def mb_per_s(seconds: float) -> float:
        return round(train_bytes / 1e6 / seconds, 3)

    raw_best = {name: min(times) for name, times in raw.items()}
    fastest_raw = min(raw_best, key=lambda name: raw_best[name])
    ours_best = min(ours_train)
    ratio = raw_best[fastest_raw] / ours_best
    result_json: dict[str, JsonValue] = {
        "benchmark": "tokenizer",
        "finishedAt": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "corpus": str(corpus_path),
        "copies": max(1, args.copies),
        "corpusBytes": len(text.encode("utf-8")),
        "trainBytes": train_bytes,
        "vocabSize": spec.vocab_size,
        "repetitions": args.repetitions,
        "loadAverage1m": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "tokenizers": tokenizers.__version__,
        "oursTrainSeconds": round(ours_best, 4),
        "oursTrainMBps": mb_per_s(ours_best),
        "oursEndToEndSeconds": round(min(ours_total), 4),
        "oursEndToEndMBps": mb_per_s(min(ours_total)),
        "raw": {
            name: {"seconds": round(best, 4), "MBps": mb_per_s(best)}
            for name, best in raw_best.items()
        },
        "fastestRaw": fastest_raw,
        "ratio": round(ratio, 3),
        "target": TARGET_RATIO,
        "meetsTarget": ratio >= TARGET_RATIO,
        "sameVocabAsRaw": {name: vocabs[name] == vocabs["ours"] for name in raw},
    }
    shutil.rmtree(scratch, ignore_errors=True)
    RESULT_PATH.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULT_PATH, result_json)
    logger.info("tokenizer_benchmark", result=str(RESULT_PATH), **result_json)


if __name__ == "__main__":
    main()
