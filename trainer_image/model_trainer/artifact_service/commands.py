"""`model-trainer artifacts serve|ls|get|logs`. Imports nothing heavy: the operator image, which
has no torch, transformers or tokenizers, runs `serve`."""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from model_trainer import log

if TYPE_CHECKING:
    from model_trainer.artifact_service.client import ArtifactsClient

logger = log.get_logger(__name__)

DEFAULT_ROOT = "/artifacts"
DEFAULT_PORT = 8082


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    artifacts = sub.add_parser(
        "artifacts",
        help="serve the artifacts volume over HTTP (read-only), and read it from anywhere",
    )
    commands = artifacts.add_subparsers(dest="artifacts_command", required=True)

    serve = commands.add_parser("serve", help="serve an artifacts root read-only over HTTP")
    serve.add_argument("--root", type=Path, default=Path(DEFAULT_ROOT))
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT)
    serve.add_argument(
        "--token-file",
        type=Path,
        default=os.environ.get("MT_ARTIFACTS_TOKEN_FILE") or None,
        help="require `Authorization: Bearer <token>` with the token in this file, re-read "
        "when it changes (default: env MT_ARTIFACTS_TOKEN_FILE; unset: no auth)",
    )

    client = argparse.ArgumentParser(add_help=False)
    client.add_argument("-n", "--namespace", default="default")
    client.add_argument(
        "--server",
        default=os.environ.get("MT_ARTIFACTS_URL") or "http://127.0.0.1:8082",
        help="artifact service URL (default: env MT_ARTIFACTS_URL, else http://127.0.0.1:8082, "
        "as `kubectl port-forward svc/<release>-artifacts 8082:80` gives)",
    )
    client.add_argument(
        "--token",
        default=os.environ.get("MT_ARTIFACTS_TOKEN") or None,
        help="bearer token (default: env MT_ARTIFACTS_TOKEN)",
    )
    resource_help = "trainingrun/NAME or tokenizerjob/NAME (also tr/NAME, tj/NAME)"

    ls = commands.add_parser(
        "ls",
        parents=[client],
        help="list a job's files, or a kind's jobs",
        description="A table on a terminal, JSON lines otherwise.",
    )
    ls.add_argument("resource", help=f"{resource_help}, or a kind alone to list its jobs")

    get = commands.add_parser(
        "get",
        parents=[client],
        help="download a file, resuming a partial download and verifying its sha256",
    )
    get.add_argument("resource", help=resource_help)
    get.add_argument("path", help="file path inside the job's directory, e.g. model.safetensors")
    get.add_argument(
        "-o", "--output", default=None, help="where to write it (default: its name; - for stdout)"
    )

    logs = commands.add_parser("logs", parents=[client], help="print a job's logs.jsonl")
    logs.add_argument("resource", help=resource_help)
    logs.add_argument("--tail", type=int, default=None, help="only the last N lines")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")


def run(args: argparse.Namespace) -> int:
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "serve": _serve,
        "ls": _ls,
        "get": _get,
        "logs": _logs,
    }
    return commands[args.artifacts_command](args)


def _serve(args: argparse.Namespace) -> int:
    from model_trainer.artifact_service.server import serve

    return serve(args.root, args.host, args.port, args.token_file)


def _client(args: argparse.Namespace) -> ArtifactsClient:
    from model_trainer.artifact_service.client import ArtifactsClient

    return ArtifactsClient(args.server, args.namespace, token=args.token)


def _ls(args: argparse.Namespace) -> int:
    from model_trainer.artifact_service.client import parse_resource

    resource = parse_resource(args.resource)
    client = _client(args)
    rows: list[dict[str, object]]
    if resource.name is None:
        rows = [dataclasses.asdict(job) for job in client.jobs(resource.kind)]
        columns = ["name", "status", "mtime"]
    else:
        rows = [dataclasses.asdict(entry) for entry in client.files(resource)]
        columns = ["path", "size", "mtime", "sha256"]
    if sys.stdout.isatty():
        sys.stdout.write(format_table(rows, columns))
    else:
        sys.stdout.write("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
    sys.stdout.flush()
    return 0


def format_table(rows: Sequence[dict[str, object]], columns: list[str]) -> str:
    def cell(row: dict[str, object], column: str) -> str:
        value = row[column]
        if value is None:
            return "-"
        if column == "size" and isinstance(value, int):
            return _human_size(value)
        if column == "sha256":
            return str(value)[:12]
        return str(value)

    cells = [[column.upper() for column in columns]]
    cells += [[cell(row, column) for column in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "".join(
        "  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip()
        + "\n"
        for line in cells
    )


def _human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def _get(args: argparse.Namespace) -> int:
    from model_trainer.artifact_service.client import parse_resource

    resource = parse_resource(args.resource)
    client = _client(args)
    output: str | None = args.output
    if output == "-":
        done = client.stream(resource, args.path, sys.stdout.buffer)
    else:
        out = Path(output) if output else Path(PurePosixPath(args.path).name)
        if out.is_dir():
            out = out / PurePosixPath(args.path).name
        done = client.download(resource, args.path, out)
    logger.info(
        "downloaded", path=done.path, bytes=done.size, sha256=done.sha256, resumed=done.resumed_from
    )
    return 0


def _logs(args: argparse.Namespace) -> int:
    from model_trainer.artifact_service.client import parse_resource

    resource = parse_resource(args.resource)
    client = _client(args)
    tail: int | None = args.tail
    if tail is not None and tail < 0:
        tail = None
    if not args.follow:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for chunk in client.logs(resource, tail):
            sys.stdout.write(decoder.decode(chunk))
        sys.stdout.write(decoder.decode(b"", final=True))
        sys.stdout.flush()
        return 0
    try:
        for line in client.follow(resource, tail):
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a follow ends
    return 0
