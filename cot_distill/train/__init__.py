"""The train stage: a student fine-tuned with TRL on curated traces (method sft), or distilled from a teacher's
logits on the same tokens (method kd).

    masking       curated rows -> token ids, labels on exactly the assistant's reply (chat template, end of turn)
    trainer       DistillSFTTrainer: TRL's SFTTrainer with a compact LM head, and the kd loss
    setup         TRL's config, student and teacher loading, LoRA, checkpoints (resumed only when made from the
                  same inputs: inputs_fingerprint), stop tokens, merging
    student_init  a student built from a teacher's own layers (init_from)
    run           run(recipe, *, slot=None), the stage; run_train(cfg, snapshot), what `-m cot_distill.train` runs
"""

from cot_distill.train.masking import (
    CHATML_TEMPLATE,
    CHATML_TOKENS,
    IGNORE,
    ChatTemplateError,
    TrainError,
    encode_conversation,
    find_end_of_turn,
    load_conversations,
    normalize_messages,
    resolve_chat_template,
    tokenize_conversations,
)
from cot_distill.train.run import finish_rank, load_train_section, main, run, run_train
from cot_distill.train.setup import (
    INPUTS_FINGERPRINT,
    STALE_CHECKPOINTS,
    InputsFingerprintCallback,
    build_sft_config,
    check_same_vocabulary,
    checkpoint_changes,
    checkpoint_dtype,
    checkpoint_to_resume,
    data_fingerprint,
    ensure_chatml_tokens,
    fingerprint_changes,
    inputs_fingerprint,
    load_student,
    load_teachers,
    lora_config,
    merge_adapter,
    move_stale_checkpoints,
    newest_complete_checkpoint,
    on_accelerator,
    prepare_student,
    set_stop_tokens,
    student_fingerprint,
    tune_cpu_allocator,
    wants_allocator_tuning,
)
from cot_distill.train.student_init import (
    build_student_from_teacher,
    ensure_student_init,
    init_student_from_teacher,
    resolve_kept_layers,
    student_init_dir,
)
from cot_distill.train.trainer import DistillSFTTrainer, add_compact_lm_head

__all__ = [
    "add_compact_lm_head", "build_sft_config", "build_student_from_teacher", "CHATML_TEMPLATE", "CHATML_TOKENS",
    "ChatTemplateError", "check_same_vocabulary", "checkpoint_changes", "checkpoint_dtype", "checkpoint_to_resume",
    "data_fingerprint", "DistillSFTTrainer", "encode_conversation", "ensure_chatml_tokens", "ensure_student_init",
    "find_end_of_turn", "finish_rank", "fingerprint_changes", "IGNORE", "init_student_from_teacher",
    "INPUTS_FINGERPRINT", "inputs_fingerprint", "InputsFingerprintCallback", "load_conversations", "load_student",
    "load_teachers", "load_train_section", "lora_config", "main", "merge_adapter", "move_stale_checkpoints",
    "newest_complete_checkpoint", "normalize_messages", "on_accelerator", "prepare_student", "resolve_chat_template",
    "resolve_kept_layers", "run", "run_train", "set_stop_tokens", "STALE_CHECKPOINTS", "student_fingerprint",
    "student_init_dir", "tokenize_conversations", "TrainError", "tune_cpu_allocator", "wants_allocator_tuning"
]
