"""Everything training needs around the steps: TRL's config, the student and teacher, their tokens, LoRA, the
checkpoint to resume, the stop tokens, and the merged model after."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from trl import SFTConfig

from cot_distill.config.train import TrainSection
from cot_distill.train.masking import CHATML_TOKENS, ChatTemplateError, TrainError

logger = logging.getLogger(__name__)


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


def build_sft_config(cfg: TrainSection) -> SFTConfig:
    """cfg.sft plus the settings this tool owns. CPU defaults, each only when `sft` leaves it unset: bf16
    autocast over float32 weights (1.6x tokens/s here), and no gradient checkpointing (its recompute costs ~1/3 more
    compute, and CPU RAM is rarely what limits a CPU-sized student). Padding stays the CPU default: padding-free
    batches need a block-diagonal mask over the whole concatenation on CPU (no varlen kernel), measured no faster
    with a 151k vocabulary and slower for backbone-heavy students; on GPU with flash-attention it is a win."""
    args = {key: value for key, value in cfg.sft.items() if key != "model_init_kwargs"}
    args["output_dir"] = cfg.output_dir
    args.setdefault("report_to", "none")
    if not on_accelerator():
        args.setdefault("use_cpu", True)
        args.setdefault("gradient_checkpointing", False)
        if "bf16" not in args and "fp16" not in args:
            args["bf16"] = cfg.bf16_autocast_on_cpu
    if args.get("padding_free") and not args.get("packing"):
        args["max_length"] = None  # enforced during our tokenization; TRL refuses padding-free with a max_length
    return SFTConfig(**args)


def prepare_student(cfg: TrainSection, sft_args: SFTConfig) -> str:
    """Path or hub id of the student; with init_from, builds it once under OUTPUT_DIR/student_init."""
    if cfg.init_from is None:
        return cfg.student
    from cot_distill.train.student_init import ensure_student_init, student_init_dir

    with sft_args.main_process_first(local=False, desc="student init"):
        return str(ensure_student_init(cfg.init_from, student_init_dir(cfg.output_dir)))


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


def load_teacher(cfg: TrainSection, student, student_tokenizer, student_path: str) -> tuple[Any, str]:
    """(frozen teacher in the student's dtype, its resolved path) for method: kd, after the vocabulary check."""
    from transformers import AutoModelForCausalLM

    from cot_distill.assets import resolve_model_path

    path = resolve_model_path(cfg.kd.teacher)  # offline asset names (smollm2-135m) as well as folders
    check_same_vocabulary(student, student_tokenizer, student_path, path)
    kwargs = {"dtype": student.dtype}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    teacher = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return teacher.eval().requires_grad_(False), path


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


def newest_complete_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint-N that finished saving: Trainer writes trainer_state.json last."""
    folder = Path(output_dir)
    steps = sorted((int(p.name.split("-")[1]), p) for p in folder.glob("checkpoint-*") if p.name[11:].isdigit())
    for _, checkpoint in reversed(steps):
        if (checkpoint / "trainer_state.json").exists():
            return str(checkpoint)
        logger.warning("skipping %s: it has no trainer_state.json (interrupted while saving)", checkpoint)
    return None


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
