"""Errors that end a job, each with its reason and its documented process exit code.

Exit codes (the operator reads them from the pod's terminated state):

    0  Succeeded
    1  Failed: an unexpected error; a retry may help
    2  InvalidInput: the spec or the data is wrong; a retry cannot help
    3  Cancelled: stopped on request; the last checkpoint and the artifacts are kept
    4  ArtifactWriteFailed: the artifacts volume refused a write (full, read-only, ...)
"""

from __future__ import annotations

EXIT_SUCCEEDED = 0
EXIT_FAILED = 1
EXIT_INVALID_INPUT = 2
EXIT_CANCELLED = 3
EXIT_ARTIFACT_WRITE_FAILED = 4


class TrainerError(Exception):
    """A failure with a message meant for the user; no traceback is shown for it."""

    exit_code = EXIT_FAILED
    reason = "TrainingFailed"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInputError(TrainerError):
    """The spec or the corpus is unusable. Retrying cannot help."""

    exit_code = EXIT_INVALID_INPUT
    reason = "InvalidInput"


class CorpusError(InvalidInputError):
    reason = "InvalidCorpus"


class TokenizerNotFoundError(InvalidInputError):
    reason = "TokenizerNotFound"


class ArtifactWriteError(TrainerError):
    """Writing to the artifacts volume failed, for example because the disk is full."""

    exit_code = EXIT_ARTIFACT_WRITE_FAILED
    reason = "ArtifactWriteFailed"


class CheckpointError(TrainerError):
    reason = "CheckpointUnusable"


class JobCancelled(Exception):
    """Raised once a cancelled job has saved its state; maps to exit code 3."""

    exit_code = EXIT_CANCELLED
    reason = "Cancelled"
