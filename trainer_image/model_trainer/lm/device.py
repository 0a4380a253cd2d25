"""Where and how the trainer computes: device, precision, CPU threads and torch.compile.

The parsing functions are pure (they take file contents) so that they can be tested without
a cgroup; the `detect_*` functions read the real files.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from model_trainer import log
from model_trainer.errors import InvalidInputError

logger = log.get_logger(__name__)

Precision = Literal["fp32", "bf16"]
RequestedPrecision = Literal["auto", "fp32", "bf16"]

THREADS_ENV = "MT_NUM_THREADS"
COMPILE_ENV = "MT_COMPILE"
# torch.compile on CPU: for the reference model (4x256, ctx 256, vocab 8192, batch 8, bf16)
# the first step took 34 s to compile on 2 cores, and the compiled steps were no faster than
# eager ones (median 445 vs 426 ms, interleaved in one process): this loop already calls fused
# kernels and is bound by bf16 matmuls. So "auto" compiles on CUDA only, and only for runs
# long enough to repay the compilation; MT_COMPILE=1 forces it anywhere.
COMPILE_MIN_STEPS = 1000

CGROUP_ROOT = Path("/sys/fs/cgroup")
# CPU feature flags (x86 /proc/cpuinfo "flags", arm64 "Features") of native bf16 matmuls.
FAST_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    source: str
    """Where the number came from: env, cgroup-v2, cgroup-v1 or affinity."""


@dataclass(frozen=True)
class CompileChoice:
    enabled: bool
    reason: str


@dataclass(frozen=True)
class Runtime:
    """How a training or evaluation process computes."""

    device: torch.device
    precision: Precision
    threads: int

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.precision == "bf16" else None


def cgroup_v2_cpu_limit(cpu_max: str) -> int | None:
    """CPUs allowed by a cgroup v2 `cpu.max` ("<quota> <period>" or "max <period>")."""
    parts = cpu_max.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    return _quota_cpus(parts[0], parts[1])


def cgroup_v1_cpu_limit(cfs_quota_us: str, cfs_period_us: str) -> int | None:
    """CPUs allowed by cgroup v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us` (quota -1: none)."""
    return _quota_cpus(cfs_quota_us.strip(), cfs_period_us.strip())


def _quota_cpus(quota: str, period: str) -> int | None:
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:
        return None
    if quota_us <= 0 or period_us <= 0:
        return None
    return max(1, math.ceil(quota_us / period_us))


def choose_threads(
    *,
    affinity_cpus: int,
    override: str | None = None,
    cpu_max: str | None = None,
    cfs_quota_us: str | None = None,
    cfs_period_us: str | None = None,
) -> ThreadChoice:
    """Threads to use: the override if set, else the cgroup CPU limit (rounded up) capped by the
    CPUs this process may run on, else those CPUs."""
    if override is not None and override.strip():
        try:
            threads = int(override)
        except ValueError:
            threads = 0
        if threads < 1:
            raise InvalidInputError(f"{THREADS_ENV} must be a positive integer, got {override!r}")
        return ThreadChoice(threads, "env")
    affinity_cpus = max(1, affinity_cpus)
    if cpu_max is not None and (limit := cgroup_v2_cpu_limit(cpu_max)) is not None:
        return ThreadChoice(min(limit, affinity_cpus), "cgroup-v2")
    if (
        cfs_quota_us is not None
        and cfs_period_us is not None
        and (limit := cgroup_v1_cpu_limit(cfs_quota_us, cfs_period_us)) is not None
    ):
        return ThreadChoice(min(limit, affinity_cpus), "cgroup-v1")
    return ThreadChoice(affinity_cpus, "affinity")


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return None


def _cgroup_v2_dir(proc_self_cgroup: str | None) -> Path:
    """The process's own cgroup v2 directory (the root inside a container's namespace)."""
    for line in (proc_self_cgroup or "").splitlines():
        if line.startswith("0::"):
            return CGROUP_ROOT / line[3:].lstrip("/")
    return CGROUP_ROOT


def affinity_cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def detect_threads(environ: Mapping[str, str] = os.environ) -> ThreadChoice:
    own_dir = _cgroup_v2_dir(_read(Path("/proc/self/cgroup")))
    cpu_max = _read(CGROUP_ROOT / "cpu.max") or _read(own_dir / "cpu.max")
    v1_dir = next(
        (d for d in (CGROUP_ROOT / "cpu", CGROUP_ROOT / "cpu,cpuacct") if d.is_dir()),
        CGROUP_ROOT / "cpu",
    )
    return choose_threads(
        affinity_cpus=affinity_cpu_count(),
        override=environ.get(THREADS_ENV),
        cpu_max=cpu_max,
        cfs_quota_us=_read(v1_dir / "cpu.cfs_quota_us"),
        cfs_period_us=_read(v1_dir / "cpu.cfs_period_us"),
    )


def apply_threads(environ: Mapping[str, str] = os.environ) -> ThreadChoice:
    choice = detect_threads(environ)
    torch.set_num_threads(choice.threads)
    return choice


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """Feature flags from /proc/cpuinfo text (x86 "flags", arm64 "Features")."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


def cpu_has_fast_bf16(flags: Iterable[str]) -> bool:
    return not FAST_BF16_FLAGS.isdisjoint(flags)


def choose_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_precision(
    requested: RequestedPrecision, device: torch.device, flags: Iterable[str]
) -> Precision:
    """auto: bf16 where the hardware has native bf16 matmuls, fp32 elsewhere."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16(flags) else "fp32"


def c_compiler() -> str | None:
    """torch.compile's CPU backend (inductor) builds C++; without a compiler it cannot run."""
    configured = os.environ.get("CXX") or os.environ.get("CC")
    candidates = [configured] if configured else []
    candidates += ["c++", "g++", "clang++", "cc", "gcc", "clang"]
    for candidate in candidates:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def choose_compile(
    remaining_steps: int,
    device_type: str,
    environ: Mapping[str, str] = os.environ,
    compiler: str | None = None,
) -> CompileChoice:
    forced = environ.get(COMPILE_ENV, "").strip().lower()
    if forced in ("0", "false", "no", "off"):
        return CompileChoice(False, f"{COMPILE_ENV}={forced}")
    if compiler is None:
        return CompileChoice(False, "no C compiler found")
    if forced in ("1", "true", "yes", "on"):
        return CompileChoice(True, f"{COMPILE_ENV}={forced}")
    if device_type != "cuda":
        return CompileChoice(False, f"no measured gain on {device_type}; {COMPILE_ENV}=1 forces it")
    if remaining_steps < COMPILE_MIN_STEPS:
        return CompileChoice(
            False, f"{remaining_steps} steps left, compiling pays off from {COMPILE_MIN_STEPS}"
        )
    return CompileChoice(True, f"{remaining_steps} steps left, C compiler {compiler}")


def detect_runtime(
    requested: RequestedPrecision, environ: Mapping[str, str] = os.environ
) -> Runtime:
    """Pick device and precision, apply the thread count, and log the choice."""
    threads = apply_threads(environ)
    device = choose_device()
    flags = cpu_flags(_read(Path("/proc/cpuinfo")) or "")
    precision = resolve_precision(requested, device, flags)
    logger.info(
        "runtime",
        device=str(device),
        precision=precision,
        requested_precision=requested,
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        fast_bf16=cpu_has_fast_bf16(flags),
        threads=threads.threads,
        threads_source=threads.source,
    )
    return Runtime(device, precision, threads.threads)


def decide_compile(
    remaining_steps: int, device: torch.device, environ: Mapping[str, str] = os.environ
) -> CompileChoice:
    choice = choose_compile(remaining_steps, device.type, environ, c_compiler())
    logger.info("compile_choice", compile=choice.enabled, reason=choice.reason)
    return choice
