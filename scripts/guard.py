"""Reject what mypy and ruff let through: `Any`, `cast`, `type: ignore` and bare `print`.

Usage: python scripts/guard.py [PATH ...]   (default: the project's Python trees)
"""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from collections.abc import Iterator
from pathlib import Path

DEFAULT_ROOTS = ("trainer_image", "operator", "tests", "bench", "scripts")
ROOT = Path(__file__).resolve().parent.parent


def _ast_findings(tree: ast.AST) -> Iterator[tuple[int, str]]:
    for node in ast.walk(tree):
        if (isinstance(node, ast.Name) and node.id == "Any") or (
            isinstance(node, ast.Attribute) and node.attr == "Any"
        ):
            yield node.lineno, "uses Any"
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if alias.name in ("Any", "cast"):
                    yield node.lineno, f"imports {alias.name}"
        elif isinstance(node, ast.Call):
            func = node.func
            name = (
                func.id
                if isinstance(func, ast.Name)
                else (func.attr if isinstance(func, ast.Attribute) else "")
            )
            if name == "cast":
                yield node.lineno, "uses cast"
            elif isinstance(func, ast.Name) and func.id == "print":
                yield node.lineno, "calls print(); log with structlog instead"


def _comment_findings(source: str) -> Iterator[tuple[int, str]]:
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            text = token.string.lstrip("#").strip().replace(" ", "")
            if text.startswith("type:ignore"):
                yield token.start[0], "has a `type: ignore` comment"


def check_file(path: Path) -> list[str]:
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path))
    found = sorted({*_ast_findings(tree), *_comment_findings(source)})
    return [f"{path}:{line}: {what}" for line, what in found]


def python_files(roots: list[Path]) -> Iterator[Path]:
    for root in roots:
        if root.is_file():
            yield root
        elif root.is_dir():
            yield from sorted(p for p in root.rglob("*.py") if ".venv" not in p.parts)


def main(argv: list[str]) -> int:
    roots = [Path(a) for a in argv] or [ROOT / r for r in DEFAULT_ROOTS]
    problems = [problem for path in python_files(roots) for problem in check_file(path)]
    for problem in problems:
        sys.stderr.write(problem + "\n")
    if problems:
        sys.stderr.write(f"guard: {len(problems)} problem(s)\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
