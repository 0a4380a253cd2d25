"""`model-trainer artifacts ls|get|logs` against a real artifact service: listings, verified and
resumable downloads, logs, and a clear message with the documented exit code for each failure."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from artifact_service_support import Tree, build_tree, running
from controlplane import free_port
from model_trainer.artifact_service.client import parse_resource
from model_trainer.artifact_service.commands import format_table
from model_trainer.artifact_service.server import ArtifactHTTPServer
from model_trainer.cli import main
from model_trainer.errors import EXIT_FAILED, EXIT_INVALID_INPUT, InvalidInputError


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return build_tree(tmp_path)


@pytest.fixture
def server(tree: Tree) -> Iterator[ArtifactHTTPServer]:
    with running(tree.root) as srv:
        yield srv


def cli(server: ArtifactHTTPServer | str, *args: str) -> int:
    url = server if isinstance(server, str) else f"http://127.0.0.1:{server.port}"
    command, rest = args[0], args[1:]
    return main(["artifacts", command, "--server", url, *rest])


def json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line]


def test_resource_forms() -> None:
    for text in ("trainingrun/a", "trainingruns/a", "tr/a", "TrainingRun.modeltrainer.io/a"):
        assert (parse_resource(text).kind, parse_resource(text).name) == ("trainingruns", "a")
    for text in ("tokenizerjob/b", "tokenizerjobs/b", "tj/b"):
        assert (parse_resource(text).kind, parse_resource(text).name) == ("tokenizerjobs", "b")
    assert parse_resource("tr").name is None
    for bad in ("pod/a", "tr/", "tr/a/b", ""):
        with pytest.raises(InvalidInputError):
            parse_resource(bad)


def test_ls_prints_json_lines_off_a_terminal(
    server: ArtifactHTTPServer, tree: Tree, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(server, "ls", "trainingrun/run-a") == 0
    files = json_lines(capsys.readouterr().out)
    by_path = {f["path"]: f for f in files}
    model = by_path["model.bin"]
    assert model["size"] == len(tree.model)
    assert model["sha256"] == hashlib.sha256(tree.model).hexdigest()
    assert "leak" not in by_path

    assert cli(server, "ls", "tj") == 0
    assert [job["name"] for job in json_lines(capsys.readouterr().out)] == ["tok"]


def test_get_downloads_and_verifies(
    server: ArtifactHTTPServer, tree: Tree, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "dl" / "model.bin"
    out.parent.mkdir()
    assert cli(server, "get", "tr/run-a", "model.bin", "-o", str(out)) == 0
    assert out.read_bytes() == tree.model
    assert not out.with_name("model.bin.part").exists()
    # Into a directory, under the file's own name.
    assert cli(server, "get", "tr/run-a", "eval/metrics.json", "-o", str(out.parent)) == 0
    assert (out.parent / "metrics.json").read_text() == '{"loss": 1.5}\n'
    err = capsys.readouterr().err
    assert '"event": "downloaded"' in err


def test_get_resumes_a_partial_download(
    server: ArtifactHTTPServer, tree: Tree, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "model.bin"
    part = tmp_path / "model.bin.part"
    part.write_bytes(tree.model[:123_456])
    assert cli(server, "get", "tr/run-a", "model.bin", "-o", str(out)) == 0
    assert out.read_bytes() == tree.model
    assert not part.exists()
    assert '"resumed": 123456' in capsys.readouterr().err

    # A .part that already holds every byte is verified and renamed (the server answers 416).
    out.unlink()
    part.write_bytes(tree.model)
    assert cli(server, "get", "tr/run-a", "model.bin", "-o", str(out)) == 0
    assert out.read_bytes() == tree.model
    assert f'"resumed": {len(tree.model)}' in capsys.readouterr().err


def test_get_refuses_a_corrupt_resume_then_succeeds_afresh(
    server: ArtifactHTTPServer, tree: Tree, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "model.bin"
    part = tmp_path / "model.bin.part"
    part.write_bytes(b"\0" * 1000)
    assert cli(server, "get", "tr/run-a", "model.bin", "-o", str(out)) == EXIT_FAILED
    err = capsys.readouterr().err
    assert '"reason": "ChecksumMismatch"' in err
    assert "Traceback" not in err
    assert not out.exists()
    assert not part.exists()
    assert cli(server, "get", "tr/run-a", "model.bin", "-o", str(out)) == 0
    assert out.read_bytes() == tree.model


def test_get_fails_when_the_file_does_not_match_its_manifest(
    server: ArtifactHTTPServer, tree: Tree, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bit rot on the volume: the manifest's sha256 travels in the headers and the client
    catches the difference."""
    manifest_path = tree.run_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["config.json"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    out = tmp_path / "config.json"
    assert cli(server, "get", "tr/run-a", "config.json", "-o", str(out)) == EXIT_FAILED
    assert '"reason": "ChecksumMismatch"' in capsys.readouterr().err
    assert not out.exists()
    assert not (tmp_path / "config.json.part").exists()


def test_get_to_stdout(
    server: ArtifactHTTPServer, tree: Tree, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    assert cli(server, "get", "tr/run-a", "config.json", "-o", "-") == 0
    assert capfdbinary.readouterr().out == b'{"n_layer": 2}\n'


def test_clear_errors_and_exit_codes(
    server: ArtifactHTTPServer, tree: Tree, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = [
        (("get", "tr/run-a", "nope.bin", "-o", str(tmp_path / "x")), "NotFound"),
        (("ls", "tr/no-such-run"), "NotFound"),
        (("ls", "pods/x"), "InvalidInput"),
        (("get", "tr/run-a", "../../secret.txt", "-o", str(tmp_path / "y")), "InvalidInput"),
    ]
    for args, reason in cases:
        assert cli(server, *args) == EXIT_INVALID_INPUT, args
        err = capsys.readouterr().err
        assert f'"reason": "{reason}"' in err, err
        assert "Traceback" not in err
    refused = f"http://127.0.0.1:{free_port()}"
    assert cli(refused, "ls", "tr/run-a") == EXIT_FAILED
    err = capsys.readouterr().err
    assert "cannot reach the artifact service" in err
    assert "Traceback" not in err


def test_token_from_flag_or_env(
    tree: Tree, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("cli-token")
    with running(tree.root, token_file) as srv:
        assert cli(srv, "ls", "tr/run-a") == EXIT_INVALID_INPUT
        assert "needs a token" in capsys.readouterr().err
        assert cli(srv, "ls", "tr/run-a", "--token", "wrong") == EXIT_INVALID_INPUT
        err = capsys.readouterr().err
        assert "rejected the token" in err
        assert "wrong" not in err
        assert cli(srv, "ls", "tr/run-a", "--token", "cli-token") == 0
        assert json_lines(capsys.readouterr().out)
        monkeypatch.setenv("MT_ARTIFACTS_TOKEN", "cli-token")
        monkeypatch.setenv("MT_ARTIFACTS_URL", f"http://127.0.0.1:{srv.port}")
        assert main(["artifacts", "logs", "tr/run-a", "--tail", "1"]) == 0
        assert capsys.readouterr().out.encode() == tree.log_lines[-1]


def test_logs_tail(
    server: ArtifactHTTPServer, tree: Tree, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(server, "logs", "trainingrun/run-a", "--tail", "3") == 0
    assert capsys.readouterr().out.encode() == b"".join(tree.log_lines[-3:])
    assert cli(server, "logs", "trainingrun/run-a") == 0
    assert capsys.readouterr().out.encode() == b"".join(tree.log_lines)


def test_logs_follow_prints_new_lines(tree: Tree, capsys: pytest.CaptureFixture[str]) -> None:
    log = tree.run_dir / "logs.jsonl"
    results: list[int] = []
    printed = ""

    def wait_for(text: str) -> None:
        nonlocal printed
        deadline = time.monotonic() + 10
        while text not in printed:
            assert time.monotonic() < deadline, printed
            time.sleep(0.02)
            printed += capsys.readouterr().out

    with running(tree.root) as srv:
        follower = threading.Thread(
            target=lambda: results.append(cli(srv, "logs", "tr/run-a", "--tail", "1", "-f"))
        )
        follower.start()
        wait_for(tree.log_lines[-1].decode())
        with log.open("ab") as handle:
            handle.write(b'{"event": "appended"}\n')
        wait_for("appended")
    # The server's shutdown ends the stream, and the command with it.
    follower.join(timeout=5)
    assert results == [0]
    printed += capsys.readouterr().out
    assert printed.splitlines() == [tree.log_lines[-1].decode().strip(), '{"event": "appended"}']


def test_ls_table_on_a_terminal() -> None:
    rows: list[dict[str, object]] = [
        {"path": "model.safetensors", "size": 5_341_104, "sha256": "41f5c591a106cbbae4"},
        {"path": "logs.jsonl", "size": 12, "sha256": None},
    ]
    assert format_table(rows, ["path", "size", "sha256"]).splitlines() == [
        "PATH               SIZE     SHA256",
        "model.safetensors  5.1 MiB  41f5c591a106",
        "logs.jsonl         12 B     -",
    ]


def test_a_redirect_never_carries_the_token_away(
    tree: Tree, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("cli-token")
    with running(tree.root, token_file) as target:

        class Redirect(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(302)
                self.send_header("Location", f"http://127.0.0.1:{target.port}{self.path}")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        redirector = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
        thread = threading.Thread(target=redirector.serve_forever)
        thread.start()
        try:
            url = f"http://127.0.0.1:{redirector.server_address[1]}"
            assert cli(url, "ls", "tr/run-a", "--token", "cli-token") == EXIT_FAILED
        finally:
            redirector.shutdown()
            redirector.server_close()
            thread.join()
    assert "answered 302" in capsys.readouterr().err
