"""Device, precision, thread and compile choices of the trainer."""

from __future__ import annotations

import pytest
import torch

from model_trainer.errors import InvalidInputError
from model_trainer.lm import device
from model_trainer.lm.device import (
    COMPILE_MIN_STEPS,
    cgroup_v1_cpu_limit,
    cgroup_v2_cpu_limit,
    choose_compile,
    choose_threads,
    cpu_flags,
    cpu_has_fast_bf16,
    resolve_precision,
)

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [
        ("200000 100000\n", 2),
        ("150000 100000", 2),  # 1.5 CPUs: round up, a thread idles part of the time
        ("50000 100000", 1),
        ("max 100000\n", None),
        ("", None),
        ("garbage", None),
        ("-1 100000", None),
    ],
)
def test_cgroup_v2_cpu_max(cpu_max: str, expected: int | None) -> None:
    assert cgroup_v2_cpu_limit(cpu_max) == expected


@pytest.mark.parametrize(
    ("quota", "period", "expected"),
    [("400000\n", "100000\n", 4), ("-1\n", "100000\n", None), ("x", "100000", None)],
)
def test_cgroup_v1_quota(quota: str, period: str, expected: int | None) -> None:
    assert cgroup_v1_cpu_limit(quota, period) == expected


def test_threads_come_from_the_cgroup_limit_capped_by_affinity() -> None:
    assert choose_threads(affinity_cpus=8, cpu_max="300000 100000") == device.ThreadChoice(
        3, "cgroup-v2"
    )
    assert choose_threads(affinity_cpus=2, cpu_max="800000 100000").threads == 2
    v1 = choose_threads(affinity_cpus=16, cfs_quota_us="250000", cfs_period_us="100000")
    assert v1 == device.ThreadChoice(3, "cgroup-v1")


def test_threads_fall_back_to_affinity_without_a_limit() -> None:
    assert choose_threads(affinity_cpus=6, cpu_max="max 100000") == device.ThreadChoice(
        6, "affinity"
    )
    assert choose_threads(
        affinity_cpus=6, cfs_quota_us="-1", cfs_period_us="100000"
    ) == device.ThreadChoice(6, "affinity")
    assert choose_threads(affinity_cpus=4).source == "affinity"


def test_env_override_wins_and_is_validated() -> None:
    assert choose_threads(affinity_cpus=2, override="5", cpu_max="100000 100000") == (
        device.ThreadChoice(5, "env")
    )
    with pytest.raises(InvalidInputError, match="MT_NUM_THREADS"):
        choose_threads(affinity_cpus=2, override="zero")
    with pytest.raises(InvalidInputError):
        choose_threads(affinity_cpus=2, override="0")


def test_apply_threads_sets_torch_threads() -> None:
    before = torch.get_num_threads()
    try:
        choice = device.apply_threads({"MT_NUM_THREADS": "1"})
        assert choice == device.ThreadChoice(1, "env")
        assert torch.get_num_threads() == 1
        assert device.detect_threads({}).threads >= 1
    finally:
        torch.set_num_threads(before)


def test_cpu_flags_and_bf16_detection() -> None:
    x86 = "processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_tile\n\nflags : sse2\n"
    assert {"avx512_bf16", "sse2"} <= cpu_flags(x86)
    assert cpu_has_fast_bf16(cpu_flags(x86))
    assert not cpu_has_fast_bf16(cpu_flags("flags : fpu avx2 avx512f\n"))
    assert cpu_has_fast_bf16(cpu_flags("Features\t: fp asimd bf16 i8mm\n"))


def test_precision_auto_follows_the_hardware_and_explicit_choices_are_honoured() -> None:
    assert resolve_precision("auto", CPU, {"avx512_bf16"}) == "bf16"
    assert resolve_precision("auto", CPU, {"avx2"}) == "fp32"
    assert resolve_precision("fp32", CPU, {"amx_bf16"}) == "fp32"
    assert resolve_precision("bf16", CPU, set()) == "bf16"


def test_compile_choice() -> None:
    gcc = "/usr/bin/gcc"
    assert not choose_compile(10, "cuda", {}, gcc).enabled
    assert choose_compile(COMPILE_MIN_STEPS, "cuda", {}, gcc).enabled
    assert not choose_compile(COMPILE_MIN_STEPS, "cpu", {}, gcc).enabled  # no gain measured
    assert not choose_compile(COMPILE_MIN_STEPS, "cuda", {}, None).enabled
    assert not choose_compile(10**6, "cuda", {"MT_COMPILE": "0"}, gcc).enabled
    assert choose_compile(1, "cpu", {"MT_COMPILE": "1"}, gcc).enabled
    forced_without_compiler = choose_compile(1, "cpu", {"MT_COMPILE": "1"}, None)
    assert not forced_without_compiler.enabled
    assert "compiler" in forced_without_compiler.reason
