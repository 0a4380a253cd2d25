"""Corpus sources (path, directory, ConfigMap, url) and the holdout split."""

from __future__ import annotations

import hashlib
import http.server
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from model_trainer.api import CorpusSource
from model_trainer.corpus import CorpusContext, load_corpus, split_holdout
from model_trainer.errors import CorpusError


def _ctx(root: Path, **kwargs) -> CorpusContext:
    return CorpusContext(artifacts_root=root, **kwargs)


# --- path ---------------------------------------------------------------------------------


def test_absolute_file_path_is_read_with_its_digest(tmp_path):
    data = b"To be, or not to be:\nthat is the question.\n"
    corpus_file = tmp_path / "elsewhere" / "hamlet.txt"
    corpus_file.parent.mkdir()
    corpus_file.write_bytes(data)
    corpus = load_corpus(CorpusSource(path=str(corpus_file)), _ctx(tmp_path / "root"))
    assert corpus.text == data.decode()
    assert corpus.sha256 == hashlib.sha256(data).hexdigest()
    assert corpus.n_bytes == len(data)
    assert corpus.source == f"path:{corpus_file}"


def test_directory_is_read_in_sorted_order_without_hidden_files(tmp_path):
    root = tmp_path / "root"
    corpus_dir = root / "texts"
    (corpus_dir / "sub").mkdir(parents=True)
    (corpus_dir / ".git").mkdir()
    (corpus_dir / "b.txt").write_text("bee\n")
    (corpus_dir / "a.txt").write_text("ay")  # no final newline: one is added between files
    (corpus_dir / "sub" / "c.txt").write_text("sea\n")
    (corpus_dir / ".hidden.txt").write_text("secret\n")
    (corpus_dir / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    corpus = load_corpus(CorpusSource(path="texts"), _ctx(root, allow_absolute_paths=False))
    assert corpus.text == "ay\nbee\nsea\n"
    assert corpus.n_bytes == len(b"ay\nbee\nsea\n")


def test_directory_with_a_non_utf8_file_names_that_file(tmp_path):
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "good.txt").write_text("fine\n")
    (tmp_path / "texts" / "bad.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(CorpusError, match=r"bad\.txt is not UTF-8: invalid byte 0xe9"):
        load_corpus(CorpusSource(path="texts"), _ctx(tmp_path))


def test_empty_directory_is_rejected(tmp_path):
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / ".only-hidden").write_text("x\n")
    with pytest.raises(CorpusError, match="holds no files"):
        load_corpus(CorpusSource(path="texts"), _ctx(tmp_path))


def test_relative_path_resolves_against_the_artifacts_root(tmp_path):
    root = tmp_path / "volume"
    (root / "data").mkdir(parents=True)
    (root / "data" / "corpus.txt").write_text("inside the volume\n")
    ctx = _ctx(root, allow_absolute_paths=False)
    assert load_corpus(CorpusSource(path="data/corpus.txt"), ctx).text == "inside the volume\n"
    # In a pod an absolute path still means a path on the volume.
    assert load_corpus(CorpusSource(path="/data/corpus.txt"), ctx).text == "inside the volume\n"


@pytest.mark.parametrize("raw", ["../outside.txt", "data/../../outside.txt", "link/outside.txt"])
def test_path_escaping_the_artifacts_root_is_rejected(tmp_path, raw):
    root = tmp_path / "volume"
    (root / "data").mkdir(parents=True)
    (tmp_path / "outside.txt").write_text("not yours\n")
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(CorpusError, match="leaves the artifacts volume"):
        load_corpus(CorpusSource(path=raw), _ctx(root, allow_absolute_paths=False))


def test_missing_path_is_rejected(tmp_path):
    with pytest.raises(CorpusError, match=r"corpus path .*nope\.txt does not exist"):
        load_corpus(CorpusSource(path="nope.txt"), _ctx(tmp_path))


def test_empty_and_non_utf8_files_are_rejected(tmp_path):
    (tmp_path / "blank.txt").write_text(" \n\n\t\n")
    (tmp_path / "latin1.txt").write_bytes(b"line one\nna\xefve\n")
    with pytest.raises(CorpusError, match=r"corpus path:blank\.txt is empty"):
        load_corpus(CorpusSource(path="blank.txt"), _ctx(tmp_path))
    with pytest.raises(CorpusError, match=r"not UTF-8: invalid byte 0xef at offset 11 \(line 2\)"):
        load_corpus(CorpusSource(path="latin1.txt"), _ctx(tmp_path))


# --- ConfigMap ----------------------------------------------------------------------------

CONFIG_MAP = {"b-part": "second part\n", "a-part": "first part"}


def test_config_map_key_from_the_context(tmp_path):
    ctx = _ctx(tmp_path, config_maps={"poems": CONFIG_MAP})
    source = CorpusSource.model_validate({"configMapRef": {"name": "poems", "key": "b-part"}})
    corpus = load_corpus(source, ctx)
    assert corpus.text == "second part\n"
    assert corpus.source == "configMap:poems/b-part"


def test_config_map_without_key_joins_all_keys_in_key_order(tmp_path):
    ctx = _ctx(tmp_path, config_maps={"poems": CONFIG_MAP})
    source = CorpusSource.model_validate({"configMapRef": {"name": "poems"}})
    assert load_corpus(source, ctx).text == "first part\nsecond part\n"


def _mount_like_kubelet(config_map_dir: Path, name: str, data: dict[str, str]) -> None:
    """kubelet's layout: <dir>/<name>/<key> -> ..data/<key>, ..data -> ..<timestamp>/"""
    mount = config_map_dir / name
    payload = mount / "..2026_01_01_00_00_00.000000000"
    payload.mkdir(parents=True)
    for key, value in data.items():
        (payload / key).write_text(value)
    (mount / "..data").symlink_to(payload.name)
    for key in data:
        (mount / key).symlink_to(Path("..data") / key)


def test_config_map_from_the_mounted_volume(tmp_path):
    _mount_like_kubelet(tmp_path / "configmaps", "poems", CONFIG_MAP)
    ctx = _ctx(tmp_path / "root", config_map_dir=tmp_path / "configmaps")
    keyed = CorpusSource.model_validate({"configMapRef": {"name": "poems", "key": "a-part"}})
    whole = CorpusSource.model_validate({"configMapRef": {"name": "poems"}})
    assert load_corpus(keyed, ctx).text == "first part"
    assert load_corpus(whole, ctx).text == "first part\nsecond part\n"


def test_missing_config_map_or_key_is_rejected(tmp_path):
    ctx = _ctx(tmp_path, config_maps={"poems": CONFIG_MAP}, config_map_dir=tmp_path / "none")
    missing_map = CorpusSource.model_validate({"configMapRef": {"name": "prose"}})
    missing_key = CorpusSource.model_validate({"configMapRef": {"name": "poems", "key": "c"}})
    with pytest.raises(CorpusError, match="ConfigMap 'prose' not found"):
        load_corpus(missing_map, ctx)
    with pytest.raises(CorpusError, match="ConfigMap 'poems' has no key 'c'"):
        load_corpus(missing_key, ctx)


# --- url ----------------------------------------------------------------------------------


@dataclass
class ServedFile:
    """What the test server serves, and what it saw."""

    content: bytes = b""
    cut_first_after: int | None = None
    """Close the connection after this many body bytes, on the first request only."""
    ranges: list[str | None] = field(default_factory=list)
    """The Range header of every GET, in order."""
    lock: threading.Lock = field(default_factory=threading.Lock)


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    served: ServedFile

    def do_GET(self) -> None:
        served = self.served
        with served.lock:
            first = not served.ranges
            served.ranges.append(self.headers.get("Range"))
        if self.path != "/corpus.txt":
            self.send_error(404)
            return
        body, start = served.content, 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match:
            start = int(match.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if first and served.cut_first_after is not None:
            self.wfile.write(body[start : start + served.cut_first_after])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body[start:])

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass


@pytest.fixture
def http_server() -> Iterator[tuple[str, ServedFile]]:
    served = ServedFile()
    handler = type("Handler", (_RangeHandler,), {"served": served})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", served
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _content(n_lines: int = 4000) -> bytes:
    return "".join(f"line {i}: the quick brown fox\n" for i in range(n_lines)).encode()


def test_download_resumes_with_a_range_request_and_checks_sha256(tmp_path, http_server):
    base, served = http_server
    served.content = _content()
    served.cut_first_after = 50_000
    digest = hashlib.sha256(served.content).hexdigest()
    source = CorpusSource(url=f"{base}/corpus.txt", sha256=digest)
    ctx = _ctx(tmp_path, download_dir=tmp_path / "cache")

    corpus = load_corpus(source, ctx)

    assert corpus.text.encode() == served.content
    assert corpus.sha256 == digest
    assert served.ranges == [None, "bytes=50000-"]
    assert (tmp_path / "cache" / digest).read_bytes() == served.content
    assert not (tmp_path / "cache" / f"{digest}.part").exists()

    # A second load is served from the cache.
    assert load_corpus(source, ctx).text == corpus.text
    assert len(served.ranges) == 2


def test_download_resumes_a_partial_file_left_by_an_earlier_attempt(tmp_path, http_server):
    base, served = http_server
    served.content = _content()
    digest = hashlib.sha256(served.content).hexdigest()
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / f"{digest}.part").write_bytes(served.content[:1234])
    source = CorpusSource(url=f"{base}/corpus.txt", sha256=digest)
    corpus = load_corpus(source, _ctx(tmp_path, download_dir=tmp_path / "cache"))
    assert corpus.text.encode() == served.content
    assert served.ranges == ["bytes=1234-"]


def test_download_with_a_wrong_sha256_is_rejected(tmp_path, http_server):
    base, served = http_server
    served.content = _content(100)
    wrong = hashlib.sha256(b"something else").hexdigest()
    source = CorpusSource(url=f"{base}/corpus.txt", sha256=wrong)
    actual = hashlib.sha256(served.content).hexdigest()
    with pytest.raises(CorpusError, match=f"has sha256 {actual}, expected {wrong}"):
        load_corpus(source, _ctx(tmp_path, download_dir=tmp_path / "cache"))
    assert list((tmp_path / "cache").iterdir()) == []  # the bad bytes are not kept for a resume


def test_download_of_a_missing_file_is_rejected(tmp_path, http_server):
    base, _served = http_server
    source = CorpusSource(url=f"{base}/missing.txt", sha256="0" * 64)
    with pytest.raises(CorpusError, match="HTTP 404"):
        load_corpus(source, _ctx(tmp_path))


# --- holdout split ------------------------------------------------------------------------


def test_holdout_is_the_tail_cut_at_a_line_boundary():
    text = "".join(f"line number {i} with some words\n" for i in range(1000))
    split = split_holdout(text, 0.1)
    assert split.train + split.holdout == text
    assert split.train.endswith("\n")
    assert split.holdout.startswith("line number ")
    assert abs(len(split.holdout) / len(text) - 0.1) < 0.01
    assert split.holdout_bytes == len(split.holdout.encode())


def test_holdout_fraction_zero_keeps_everything_for_training():
    split = split_holdout("a\nb\n", 0.0)
    assert (split.train, split.holdout) == ("a\nb\n", "")


def test_cut_inside_the_last_line_moves_back_to_the_previous_line():
    text = "short\n" + "x" * 200 + "\n"
    split = split_holdout(text, 0.05)
    assert (split.train, split.holdout) == ("short\n", "x" * 200 + "\n")


@pytest.mark.parametrize("text", ["one single line without a break", "one line\n", "\n\n\nx\n"])
def test_too_small_corpus_cannot_give_a_holdout(text):
    with pytest.raises(CorpusError, match="too small to split off a holdout of 5%"):
        split_holdout(text, 0.05)
