"""Resumable checkpoints: out_dir/checkpoints/step-00000123/ with the model weights, optimizer
state, random generator states and a meta.json holding the sha256 of every other file.

A checkpoint directory is written under a temporary name, fsynced and renamed, so a crash
never leaves a half-written directory under a final name. On resume the newest checkpoint
whose digests verify is used; one that fails is renamed to `*.corrupt` (or `*.stale` when it
belongs to a different spec) so that it is never tried again.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch
from pydantic import JsonValue
from torch import nn

from model_trainer import artifacts, log
from model_trainer.api.common import EvalMetrics
from model_trainer.errors import CheckpointError

logger = log.get_logger(__name__)

KEEP_CHECKPOINTS = 2
FORMAT_VERSION = 1
META_FILE = "meta.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.safetensors"
CORRUPT_SUFFIX = ".corrupt"
STALE_SUFFIX = ".stale"
_NAME = re.compile(r"^step-(\d{8,})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


@dataclass(frozen=True)
class TrainerState:
    """Loop state besides tensors that a resumed run needs to continue exactly."""

    step: int
    smoothed_loss: float | None = None
    tokens_seen: int = 0
    eval_history: tuple[EvalMetrics, ...] = ()

    def to_json(self) -> dict[str, JsonValue]:
        return {
            "step": self.step,
            "smoothedLoss": self.smoothed_loss,
            "tokensSeen": self.tokens_seen,
            "evalHistory": [m.model_dump(mode="json", by_alias=True) for m in self.eval_history],
        }

    @classmethod
    def from_json(cls, value: JsonValue) -> TrainerState:
        if not isinstance(value, dict):
            raise CheckpointError("trainer state is not an object")
        step, loss, seen, history = (
            value.get("step"),
            value.get("smoothedLoss"),
            value.get("tokensSeen"),
            value.get("evalHistory"),
        )
        if not isinstance(step, int) or not isinstance(seen, int) or not isinstance(history, list):
            raise CheckpointError("trainer state lacks step, tokensSeen or evalHistory")
        if loss is not None and not isinstance(loss, int | float):
            raise CheckpointError("trainer state has a non-numeric smoothedLoss")
        return cls(
            step=step,
            smoothed_loss=None if loss is None else float(loss),
            tokens_seen=seen,
            eval_history=tuple(EvalMetrics.model_validate(m) for m in history),
        )


@dataclass(frozen=True)
class RngState:
    """Every random generator the training loop draws from."""

    torch_cpu: torch.Tensor
    data: torch.Tensor
    python: tuple[int, tuple[int, ...], float | None]
    cuda: tuple[torch.Tensor, ...] = field(default_factory=tuple)


def capture_rng(data_generator: torch.Generator) -> RngState:
    version, internal, gauss = random.getstate()
    if not isinstance(version, int) or not isinstance(internal, tuple):
        raise CheckpointError("unexpected python random state layout")
    cuda = tuple(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else ()
    return RngState(
        torch_cpu=torch.get_rng_state(),
        data=data_generator.get_state(),
        python=(version, tuple(int(x) for x in internal), gauss if gauss is None else float(gauss)),
        cuda=cuda,
    )


def restore_rng(state: RngState, data_generator: torch.Generator) -> None:
    torch.set_rng_state(state.torch_cpu)
    data_generator.set_state(state.data)
    random.setstate(state.python)
    if state.cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state.cuda))


def _rng_tensors(state: RngState) -> dict[str, torch.Tensor]:
    tensors = {
        "torch_cpu": state.torch_cpu,
        "data": state.data,
        "python": torch.tensor(state.python[1], dtype=torch.int64),
    }
    tensors.update({f"cuda_{i}": t for i, t in enumerate(state.cuda)})
    return tensors


def _rng_from(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, JsonValue]) -> RngState:
    python = meta.get("pythonRandom")
    if not isinstance(python, dict):
        raise CheckpointError("meta.json lacks pythonRandom")
    version, gauss = python.get("version"), python.get("gauss")
    if not isinstance(version, int) or not (gauss is None or isinstance(gauss, float)):
        raise CheckpointError("meta.json has a malformed pythonRandom")
    try:
        cuda = tuple(tensors[f"cuda_{i}"] for i in range(len(tensors) - 3))
        internal = tuple(int(x) for x in tensors["python"].tolist())
        return RngState(tensors["torch_cpu"], tensors["data"], (version, internal, gauss), cuda)
    except KeyError as exc:
        raise CheckpointError(f"random state lacks {exc}") from None


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied parameters stored once (under their first name)."""
    seen: set[int] = set()
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        tensors[name] = tensor.detach().contiguous().cpu()
    return tensors


def _optimizer_bytes(optimizer: torch.optim.Optimizer) -> bytes:
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    return buffer.getvalue()


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    state: TrainerState
    model: dict[str, torch.Tensor]
    optimizer: dict[str, object]
    rng: RngState


def _write_durably(path: Path, data: bytes) -> None:
    """The one place checkpoint bytes reach the disk."""
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def save_checkpoint(
    directory: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    rng: RngState,
    state: TrainerState,
    fingerprint: str,
) -> Path:
    """Write checkpoint `state.step` atomically, then delete all but the newest ones."""
    final = directory / checkpoint_name(state.step)
    files = {
        MODEL_FILE: safetensors.torch.save(model_tensors(model), metadata={"format": "pt"}),
        OPTIMIZER_FILE: _optimizer_bytes(optimizer),
        RNG_FILE: safetensors.torch.save(_rng_tensors(rng)),
    }
    meta: dict[str, JsonValue] = {
        "format": FORMAT_VERSION,
        "step": state.step,
        "fingerprint": fingerprint,
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()},
        "trainer": state.to_json(),
        "pythonRandom": {"version": rng.python[0], "gauss": rng.python[2]},
    }
    files[META_FILE] = artifacts.canonical_json(meta).encode("utf-8")
    tmp: Path | None = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=directory))
        for name, data in files.items():
            _write_durably(tmp / name, data)
        artifacts.fsync_dir(tmp)
        _replace_dir(tmp, final)
        artifacts.fsync_dir(directory)
    except OSError as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise artifacts.write_error(final, exc) from exc
    _prune(directory)
    logger.info("checkpoint_saved", step=state.step, path=str(final))
    return final


def _replace_dir(source: Path, target: Path) -> None:
    if not target.exists():
        source.rename(target)
        return
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    target.rename(old)
    source.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _step_dirs(directory: Path) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def _prune(directory: Path) -> None:
    for _, path in _step_dirs(directory)[KEEP_CHECKPOINTS:]:
        shutil.rmtree(path, ignore_errors=True)
    for leftover in directory.glob(".step-*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)


def candidates(directory: Path) -> Iterator[Path]:
    """Checkpoint directories, newest first."""
    for _, path in _step_dirs(directory):
        yield path


class StaleCheckpointError(CheckpointError):
    """The checkpoint is intact but was written for a different spec."""


def read_checkpoint(path: Path, fingerprint: str) -> Checkpoint:
    """Verify every digest and parse the files; CheckpointError if anything is off."""
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{META_FILE} is unreadable: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{META_FILE} is not a format {FORMAT_VERSION} checkpoint")
    if meta.get("fingerprint") != fingerprint:
        raise StaleCheckpointError("it was written for a different spec, tokenizer or corpus")
    digests = meta.get("files")
    if not isinstance(digests, dict) or set(digests) != {MODEL_FILE, OPTIMIZER_FILE, RNG_FILE}:
        raise CheckpointError(f"{META_FILE} does not list the checkpoint files")
    contents: dict[str, bytes] = {}
    for name, expected in digests.items():
        try:
            data = (path / name).read_bytes()
        except OSError as exc:
            raise CheckpointError(f"{name} is unreadable: {exc.strerror}") from None
        if hashlib.sha256(data).hexdigest() != expected:
            raise CheckpointError(f"{name} does not match its sha256")
        contents[name] = data
    try:
        model = safetensors.torch.load(contents[MODEL_FILE])
        rng = _rng_from(safetensors.torch.load(contents[RNG_FILE]), meta)
        optimizer = torch.load(io.BytesIO(contents[OPTIMIZER_FILE]), weights_only=True)
    except Exception as exc:  # digests matched, yet a file is malformed: any parse error
        raise CheckpointError(f"checkpoint files cannot be parsed: {exc}") from None
    if not isinstance(optimizer, dict):
        raise CheckpointError(f"{OPTIMIZER_FILE} holds no optimizer state")
    state = TrainerState.from_json(meta.get("trainer"))
    if state.step != meta.get("step"):
        raise CheckpointError(f"{META_FILE} disagrees with itself about the step")
    return Checkpoint(path, state, model, {str(k): v for k, v in optimizer.items()}, rng)


def restore(
    checkpoint: Checkpoint,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_generator: torch.Generator,
) -> TrainerState:
    """Load the checkpoint into live objects. On CheckpointError they may be half-loaded."""
    expected = model_tensors(model)
    if set(expected) != set(checkpoint.model):
        raise CheckpointError("its weights do not match the model's parameter names")
    for name, tensor in expected.items():
        if checkpoint.model[name].shape != tensor.shape:
            raise CheckpointError(f"its {name} has shape {tuple(checkpoint.model[name].shape)}")
    try:
        model.load_state_dict(checkpoint.model, strict=False)
        optimizer.load_state_dict(checkpoint.optimizer)
        restore_rng(checkpoint.rng, data_generator)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"cannot be loaded: {exc}") from None
    return checkpoint.state


def quarantine(path: Path, error: CheckpointError) -> None:
    """Rename a checkpoint that failed so that no later start tries it again."""
    suffix = STALE_SUFFIX if isinstance(error, StaleCheckpointError) else CORRUPT_SUFFIX
    target = path.with_name(path.name + suffix)
    logger.warning(
        "checkpoint_unusable", path=str(path), error=error.message, renamed_to=str(target)
    )
    try:
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        path.rename(target)
    except OSError as exc:
        logger.warning("checkpoint_quarantine_failed", path=str(path), error=str(exc))
