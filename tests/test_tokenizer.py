"""Tokenizer training on a slice of tinyshakespeare: outputs, determinism, statistics, failures."""

from __future__ import annotations

import errno
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from lm_support import SHAKESPEARE, RecordingReporter
from model_trainer.api import ArtifactsStatus, TokenizerJob
from model_trainer.api.tokenizer_job import TokenizerJobSpec
from model_trainer.corpus import CorpusContext, split_holdout
from model_trainer.errors import (
    ArtifactWriteError,
    CorpusError,
    InvalidInputError,
    JobCancelled,
    TokenizerNotFoundError,
)
from model_trainer.tokenizer import (
    TOKENIZER_FILE,
    SpecialTokenIds,
    TokenizerResult,
    load_tokenizer,
    special_token_ids,
    train_tokenizer,
)

SLICE_CHARS = 120_000
ALGORITHMS = ["bpe", "unigram", "wordpiece"]


@pytest.fixture(scope="module")
def shakespeare() -> str:
    if not SHAKESPEARE.is_file():
        pytest.fail(f"test data missing: {SHAKESPEARE}", pytrace=False)
    text = SHAKESPEARE.read_text(encoding="utf-8")[:SLICE_CHARS]
    return text[: text.rfind("\n") + 1]


@pytest.fixture
def root(tmp_path: Path, shakespeare: str) -> Path:
    (tmp_path / "corpus.txt").write_text(shakespeare, encoding="utf-8")
    return tmp_path


def _job(name: str = "tok", **spec: object) -> TokenizerJob:
    body: dict[str, object] = {"vocabSize": 600, "corpus": {"path": "corpus.txt"}}
    body.update(spec)
    return TokenizerJob.model_validate({"metadata": {"name": name, "uid": "u-1"}, "spec": body})


def _train(
    root: Path, job: TokenizerJob, out: str = "out", reporter: RecordingReporter | None = None
) -> TokenizerResult:
    return train_tokenizer(
        job, root / out, CorpusContext(artifacts_root=root), reporter or RecordingReporter()
    )


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_each_algorithm_trains_and_reports(root, shakespeare, algorithm):
    reporter = RecordingReporter()
    job = _job(algorithm=algorithm, specialTokens=["<|endoftext|>", "<|pad|>", "<|sep|>"])
    result = _train(root, job, reporter=reporter)

    tokenizer = load_tokenizer(result.tokenizer_path)
    assert result.tokenizer_path == root / "out" / TOKENIZER_FILE
    assert 300 < tokenizer.get_vocab_size() <= 600
    assert [tokenizer.token_to_id(t) for t in ["<|endoftext|>", "<|pad|>", "<|sep|>"]] == [0, 1, 2]
    ids = special_token_ids(tokenizer)
    assert (ids.eos, ids.pad) == (0, 1)
    assert ids.unk == (None if algorithm == "bpe" else 3)

    holdout = split_holdout(shakespeare, 0.05).holdout
    stats = result.stats
    assert stats.vocab_size == tokenizer.get_vocab_size()
    assert stats.holdout_bytes == len(holdout.encode())
    assert 1.5 < stats.bytes_per_token < 6.0
    holdout_ids = tokenizer.encode(holdout, add_special_tokens=False).ids
    assert stats.holdout_tokens == len(holdout_ids)
    assert stats.bytes_per_token == pytest.approx(stats.holdout_bytes / len(holdout_ids))
    assert stats.unknown_rate == 0.0  # every character of the holdout occurs in training
    assert stats.character_coverage == 1.0
    assert stats.vocab_used_fraction == pytest.approx(len(set(holdout_ids)) / stats.vocab_size)
    assert 0.1 < stats.vocab_used_fraction < 1.0

    sample = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    encoded = tokenizer.encode(sample)
    assert "<|unk|>" not in encoded.tokens
    if algorithm == "wordpiece":  # lossy by design: whitespace is not kept
        assert tokenizer.decode(encoded.ids).split() == sample.replace(":", " :").split()
    else:
        assert tokenizer.decode(encoded.ids) == sample

    assert [(p.step, p.total_steps, p.percent) for p in reporter.progress_reports] == [
        (0, 1, 0),
        (1, 1, 100),
    ]
    assert reporter.artifact_reports == [
        ArtifactsStatus(path=str(root / "out"), manifest_sha256=result.manifest_sha256)
    ]


def test_byte_level_bpe_round_trips_any_text(root):
    tokenizer = load_tokenizer(_train(root, _job()).tokenizer_path)
    text = "naïve café — 🙂 ∑ 東京\t\ttabs  and\r\nCRLF, NUL \x00 and <|pad|> inline"
    encoded = tokenizer.encode(text)
    assert tokenizer.decode(encoded.ids, skip_special_tokens=False) == text
    assert encoded.ids.count(1) == 1  # the special token is one token, not bytes


def test_manifest_records_every_file_and_the_job(root, shakespeare):
    result = _train(root, _job(name="shakes", seed=7))
    out = root / "out"
    manifest_bytes = (out / "manifest.json").read_bytes()
    manifest = json.loads(manifest_bytes)

    assert hashlib.sha256(manifest_bytes).hexdigest() == result.manifest_sha256
    on_disk = {p.name for p in out.iterdir()}
    assert on_disk == {"tokenizer.json", "manifest.json"}  # no temporary files left
    assert manifest["files"] == {
        "tokenizer.json": hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()
    }
    assert manifest["kind"] == "TokenizerJob"
    assert (manifest["name"], manifest["namespace"], manifest["uid"]) == (
        "shakes",
        "default",
        "u-1",
    )
    assert manifest["status"] == "succeeded"
    assert manifest["config"] == _job(seed=7).spec.model_dump(mode="json", by_alias=True)
    assert manifest["config"]["seed"] == 7
    assert manifest["stats"] == result.stats.model_dump(mode="json", by_alias=True)
    data = shakespeare.encode()
    split = split_holdout(shakespeare, 0.05)
    assert manifest["corpus"] == {
        "source": "path:corpus.txt",
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "trainBytes": len(split.train.encode()),
        "holdoutBytes": split.holdout_bytes,
    }
    assert set(manifest["versions"]) == {"python", "tokenizers", "model_trainer"}
    assert manifest["startedAt"].endswith("Z") and manifest["finishedAt"].endswith("Z")
    assert manifest["durationSeconds"] >= 0


_TRAIN_IN_A_SUBPROCESS = """
import sys
from pathlib import Path
from model_trainer.api import TokenizerJob
from model_trainer.corpus import CorpusContext
from model_trainer.reporting import NullReporter
from model_trainer.tokenizer import train_tokenizer
root = Path(sys.argv[1])
job = TokenizerJob.model_validate_json(sys.argv[2])
train_tokenizer(job, root / sys.argv[3], CorpusContext(artifacts_root=root), NullReporter())
"""


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_same_input_and_seed_give_a_byte_identical_tokenizer(root, algorithm):
    """tokenizers' Rust hash maps are seeded per process and per map, so compare runs in this
    process and in a fresh one."""
    job = _job(algorithm=algorithm, vocabSize=800, seed=3)
    _train(root, job, "first")
    _train(root, job, "second")
    subprocess.run(
        [sys.executable, "-c", _TRAIN_IN_A_SUBPROCESS, str(root), job.model_dump_json(), "third"],
        check=True,
        timeout=120,
    )
    first = (root / "first" / TOKENIZER_FILE).read_bytes()
    assert (root / "second" / TOKENIZER_FILE).read_bytes() == first
    assert (root / "third" / TOKENIZER_FILE).read_bytes() == first


def test_holdout_is_never_trained_on(tmp_path, shakespeare):
    rare = "zyxquorblat"
    assert rare not in shakespeare
    tail = "".join(f"{rare} {rare} {rare}\n" for _ in range(250))
    text = shakespeare + tail
    split = split_holdout(text, 0.1)
    assert rare not in split.train and split.holdout.endswith(tail)
    (tmp_path / "corpus.txt").write_text(text)

    held_out = load_tokenizer(_train(tmp_path, _job(holdoutFraction=0.1), "held").tokenizer_path)
    trained_on = load_tokenizer(_train(tmp_path, _job(holdoutFraction=0.0), "all").tokenizer_path)

    assert len(held_out.encode(f" {rare}").ids) >= 4
    assert not [t for t in held_out.get_vocab() if "quorb" in t]
    # The control: the same word, when it is in the training split, becomes one token.
    assert trained_on.encode(f" {rare}").tokens == [f"\u0120{rare}"]


@pytest.mark.parametrize("algorithm", ["unigram", "wordpiece"])
def test_unknown_characters_count_against_coverage(root, shakespeare, algorithm):
    unseen_line = "ΩΩΩ ψψ\n"
    text = shakespeare + unseen_line
    (root / "corpus.txt").write_text(text)
    result = _train(root, _job(algorithm=algorithm))
    holdout = split_holdout(text, 0.05).holdout
    assert holdout.endswith(unseen_line)

    stats = result.stats
    assert stats.unknown_rate == pytest.approx(2 / stats.holdout_tokens)  # ΩΩΩ and ψψ
    assert stats.character_coverage == pytest.approx(1 - 5 / len(holdout))


def test_byte_level_bpe_has_no_unknown_tokens(root, shakespeare):
    (root / "corpus.txt").write_text(shakespeare + "ΩΩΩ ψψ 🙂\n")
    stats = _train(root, _job()).stats
    assert (stats.unknown_rate, stats.character_coverage) == (0.0, 1.0)


def test_custom_special_tokens_keep_their_order_before_unk(root):
    job = _job(algorithm="unigram", specialTokens=["<s>", "</s>"], unkToken="<unk>")
    tokenizer = load_tokenizer(_train(root, job).tokenizer_path)
    assert [tokenizer.id_to_token(i) for i in range(3)] == ["<s>", "</s>", "<unk>"]
    assert special_token_ids(tokenizer) == SpecialTokenIds(eos=0, pad=1, unk=2)


# --- bad input: nothing is written --------------------------------------------------------


def _assert_no_result(out: Path) -> None:
    """Neither output, nor a temporary file that could become one."""
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert "manifest.json" not in left
    assert TOKENIZER_FILE not in left
    assert not [name for name in left if name.endswith(".tmp")]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"corpus path:corpus\.txt is empty"),
        (b"  \n\n\t\n", r"corpus path:corpus\.txt is empty"),
        (
            b"good line\nbad \xff\xfe line\n",
            r"not UTF-8: invalid byte 0xff at offset 14 \(line 2\)",
        ),
    ],
    ids=["empty", "blank", "non-utf8"],
)
def test_unusable_corpus_fails_clearly_and_retires_an_old_manifest(tmp_path, content, message):
    (tmp_path / "corpus.txt").write_bytes(content)
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text('{"status": "succeeded"}\n')  # from an earlier run
    reporter = RecordingReporter()
    with pytest.raises(CorpusError, match=message):
        _train(tmp_path, _job(), reporter=reporter)
    _assert_no_result(out)
    assert reporter.artifact_reports == []


def test_missing_corpus_path_fails_clearly(tmp_path):
    with pytest.raises(CorpusError, match=r"corpus path .*corpus\.txt does not exist"):
        _train(tmp_path, _job())
    _assert_no_result(tmp_path / "out")


def test_bpe_vocab_below_the_byte_alphabet_is_rejected_by_the_spec():
    with pytest.raises(ValidationError, match=r"bpe needs at least 259 \(256 bytes \+ 3 special"):
        TokenizerJobSpec.model_validate(
            {"vocabSize": 258, "specialTokens": ["a", "b", "c"], "corpus": {"path": "x"}}
        )
    assert TokenizerJobSpec.model_validate({"vocabSize": 258, "corpus": {"path": "x"}})


@pytest.mark.parametrize("algorithm", ["unigram", "wordpiece"])
def test_vocab_too_small_for_the_alphabet_is_invalid_input(root, algorithm):
    with pytest.raises(InvalidInputError, match=f"vocabSize 40 is too small for a {algorithm}"):
        _train(root, _job(algorithm=algorithm, vocabSize=40))
    _assert_no_result(root / "out")


# --- disk full ----------------------------------------------------------------------------


@pytest.mark.parametrize("failing_write", [1, 2], ids=["tokenizer.json", "manifest.json"])
def test_disk_full_leaves_no_result_behind(root, monkeypatch, failing_write):
    """The edge: the n-th file write of the job writes half its bytes, then the disk is full."""
    real_write_bytes = Path.write_bytes
    writes: list[Path] = []

    def write_bytes_until_full(self: Path, data: bytes) -> int:
        writes.append(self)
        if len(writes) == failing_write:
            real_write_bytes(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes_until_full)
    reporter = RecordingReporter()
    with pytest.raises(
        ArtifactWriteError,
        match="disk full while writing .*" + ("tokenizer" if failing_write == 1 else "manifest"),
    ):
        _train(root, _job(), reporter=reporter)
    assert len(writes) == failing_write
    assert list((root / "out").iterdir()) == []
    assert reporter.artifact_reports == []


# --- cancellation and loading -------------------------------------------------------------


def test_cancel_before_training_writes_nothing(root):
    with pytest.raises(JobCancelled):
        _train(root, _job(), reporter=RecordingReporter(cancel_on_call=1))
    _assert_no_result(root / "out")


def test_load_tokenizer_reports_a_missing_or_broken_file(tmp_path):
    with pytest.raises(TokenizerNotFoundError, match=r"tokenizer file .*absent\.json does not"):
        load_tokenizer(tmp_path / "absent.json")
    (tmp_path / "broken.json").write_text('{"model": ')
    with pytest.raises(TokenizerNotFoundError, match=r"broken\.json cannot be loaded"):
        load_tokenizer(tmp_path / "broken.json")
