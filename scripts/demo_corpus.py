"""Write the demo corpus: the Python standard library's own source, which every machine with
Python has. Deterministic for a given Python version.

Usage: python scripts/demo_corpus.py OUT_FILE [MAX_MEGABYTES]
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

from model_trainer import log

DEFAULT_MAX_MB = 4.0


def collect(stdlib: Path, max_bytes: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    for path in sorted(stdlib.glob("*.py")):
        data = path.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if total + len(data) > max_bytes:
            break
        chunks.append(data if data.endswith(b"\n") else data + b"\n")
        total += len(chunks[-1])
    return b"".join(chunks)


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else Path("demo-artifacts/corpora/python-stdlib.txt")
    max_mb = float(argv[1]) if len(argv) > 1 else DEFAULT_MAX_MB
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    data = collect(stdlib, int(max_mb * 1_000_000))
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.is_file() or out.read_bytes() != data:
        out.write_bytes(data)
    log.configure()
    logger = log.get_logger("demo_corpus")
    logger.info("demo_corpus", path=str(out), bytes=len(data), stdlib=str(stdlib))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
