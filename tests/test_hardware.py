"""dtype ``auto`` on a CPU: bfloat16 only where the CPU computes bf16 natively."""

from __future__ import annotations

import pytest
import torch

from composer import hardware
from composer.hardware import choose_cpu_dtype, cpu_flags, resolve_dtype

AVX2_ONLY = {"fpu", "sse4_2", "avx", "avx2", "fma"}  # the CI kind's development machines
ZEN4 = AVX2_ONLY | {"avx512f", "avx512_bf16"}
SAPPHIRE_RAPIDS = AVX2_ONLY | {"avx512f", "amx_tile", "amx_bf16"}
GRAVITON3 = {"fp", "asimd", "sve", "bf16"}


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (AVX2_ONLY, "float32"),
        (ZEN4, "bfloat16"),
        (SAPPHIRE_RAPIDS, "bfloat16"),
        (GRAVITON3, "bfloat16"),
        (AVX2_ONLY | {"avx512f"}, "float32"),
    ],
)
def test_flags_decide_when_known(flags, expected):
    assert choose_cpu_dtype(flags) == expected
    # a timing cannot overrule flags (a busy machine times noisily)
    assert choose_cpu_dtype(flags, timing=(0.01, 1.0) if expected == "float32" else (9, 1)) == (
        expected
    )


def test_without_flags_a_timed_matmul_decides_and_nothing_known_is_float32():
    assert choose_cpu_dtype(None, timing=(0.086, 0.189)) == "bfloat16"  # AVX512-BF16 EPYC
    assert choose_cpu_dtype(None, timing=(75.1, 0.57)) == "float32"  # AVX2 only
    assert choose_cpu_dtype(None, timing=(0.5, 0.5)) == "float32"  # no gain: keep float32
    assert choose_cpu_dtype(None) == "float32"


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\n")
    assert cpu_flags(x86) == {"fpu", "avx2", "avx512_bf16"}
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert cpu_flags(arm) == {"fp", "asimd", "bf16"}
    assert cpu_flags(tmp_path / "missing") is None
    (tmp_path / "bare").write_text("processor\t: 0\n")
    assert cpu_flags(tmp_path / "bare") is None


def test_auto_on_cpu_follows_the_decision_and_is_decided_once(monkeypatch):
    calls = []

    def fake_flags():
        calls.append(1)
        return frozenset(ZEN4)

    hardware.cpu_auto_dtype.cache_clear()
    monkeypatch.setattr(hardware, "cpu_flags", fake_flags)
    try:
        assert resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
        assert resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
        assert len(calls) == 1
        monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(AVX2_ONLY))
        hardware.cpu_auto_dtype.cache_clear()
        assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
        assert resolve_dtype("float32", torch.device("cpu")) == torch.float32
        assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16  # as before
    finally:
        hardware.cpu_auto_dtype.cache_clear()


def test_the_timed_probe_returns_two_positive_times():
    bf16_s, fp32_s = hardware.time_matmul(size=64, repeats=1)
    assert bf16_s > 0 and fp32_s > 0


def test_training_on_a_cpu_flushes_subnormals_inside_the_block_only():
    from composer.hardware import flushed_denormals

    def product() -> float:  # 1e-40 is subnormal in float32 (the smallest normal is 1.2e-38)
        return (torch.tensor([1e-30]) * torch.tensor([1e-10])).item()

    assert product() > 0
    with flushed_denormals(enabled=True):
        assert product() == 0.0
    assert product() > 0  # torch's default again after the block
    with flushed_denormals(enabled=False):  # a GPU run leaves the CPU flag alone
        assert product() > 0
