"""The train stage's entries.

run_train(cfg, recipe_snapshot): resolve -> write the resolved config -> load the student -> tokenize with an explicit
assistant mask -> train (continuing from the newest checkpoint, when it was made from the same inputs: see
setup.checkpoint_to_resume) -> save model, tokenizer, chat template,
generation_config -> manifest.json last. `python -m cot_distill.train TRAIN_SECTION.yaml` runs the same function, so
`accelerate launch ... -m cot_distill.train ...` trains on many devices unchanged. run(recipe, *, slot=None) is the
uniform stage entry.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import Any

from trl import SFTConfig

from cot_distill.config import Recipe, recipe_snapshot
from cot_distill.config.train import TrainSection
from cot_distill.records import MANIFEST, invalidate_manifest, read_json, write_json_atomic, write_manifest
from cot_distill.train.masking import (
    IGNORE,
    TrainError,
    encode_conversation,
    find_end_of_turn,
    load_conversations,
    normalize_messages,
    resolve_chat_template,
    tokenize_conversations,
)
from cot_distill.train.on_policy import OnPolicyTrainer, ServedTeacherScorer, prompts_dataset
from cot_distill.train.recorded import recorded_reply
from cot_distill.train.setup import (
    STALE_CHECKPOINTS,
    InputsFingerprintCallback,
    build_distillation_config,
    build_sft_config,
    checkpoint_dtype,
    checkpoint_to_resume,
    ensure_chatml_tokens,
    inputs_fingerprint,
    load_student,
    load_teachers,
    lora_config,
    merge_adapter,
    on_accelerator,
    prepare_student,
    set_stop_tokens,
    tune_cpu_allocator,
    wants_allocator_tuning,
)
from cot_distill.train.student_init import LAYER_SCORES
from cot_distill.train.trainer import DistillSFTTrainer

logger = logging.getLogger(__name__)


def _output_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and p.name != MANIFEST
                  and not p.relative_to(folder).parts[0].startswith(("checkpoint-", "student_init", STALE_CHECKPOINTS)))


def finish_rank() -> None:
    """End a rank of a multi-process launch (`accelerate launch`, WORLD_SIZE > 1) that has trained and written its
    output: leave the process group, flush, and exit without the interpreter's teardown. Left to that teardown, the
    gloo backend (kept alive by DDP's reducer even after destroy_process_group) can abort a rank that finished
    training ("terminate called without an active exception", SIGABRT, pytorch/pytorch#190489; PR #179291, an
    atexit fix in torch, was abandoned): a 2-rank CI run failed so after both ranks had trained. Every file is
    written and closed by now (the manifest fsynced); a process that is no rank returns and exits as usual."""
    import torch.distributed

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_train(cfg: TrainSection, recipe_snapshot: dict[str, Any], *, callbacks: list | None = None) -> Path:
    """Train cfg's student on cfg.dataset; returns OUTPUT_DIR, which holds the model (or adapter, and with merge a
    merged model in OUTPUT_DIR/merged) and, written last, manifest.json. `callbacks`: extra transformers
    TrainerCallbacks (progress reporting, benchmarks, tests)."""
    if cfg.dataset is None:
        raise TrainError("train.dataset is not set")
    if not Path(cfg.dataset).exists():  # before the student loads: a wrong path must fail in a second
        raise TrainError(f"training data {cfg.dataset} does not exist: run `cot-distill curate` first, or set "
                         f"train.dataset")
    output_dir = Path(cfg.output_dir)
    sft_args = build_distillation_config(cfg) if cfg.method == "on_policy" else build_sft_config(cfg)
    is_main = sft_args.process_index == 0
    if wants_allocator_tuning(cfg) and sft_args.use_cpu:
        tune_cpu_allocator()
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        invalidate_manifest(output_dir)
        resolved = {"train": cfg.model_dump(mode="json"), "sft_config": sft_args.to_dict()}
        write_json_atomic(output_dir / "train_config.resolved.json", resolved)
        logger.info("train config: %s", resolved["train"])

    student_path = prepare_student(cfg, sft_args)
    fingerprint = inputs_fingerprint(cfg, student_path)
    # The main process decides first, moving checkpoints of other inputs aside; the others then find what it left.
    with sft_args.main_process_first(local=False, desc="checkpoint check"):
        resume_from = checkpoint_to_resume(cfg, fingerprint, is_main=is_main)
    model, tokenizer = load_student(cfg, student_path)
    save_dtype = checkpoint_dtype(cfg, student_path)
    train_template, saved_template = resolve_chat_template(tokenizer, cfg)
    ensure_chatml_tokens(model, tokenizer, train_template, lora=cfg.lora is not None)
    end_of_turn = find_end_of_turn(tokenizer, train_template, cfg.assistant_mask)
    # Loaded before the data so that a wrong teacher fails in seconds; after ensure_chatml_tokens, which may grow
    # the student's vocabulary.
    recorded = cfg.kd is not None and cfg.kd.recorded  # the teacher's top-K from generate's records, no model
    teachers = load_teachers(cfg, model, tokenizer, student_path)  # [] for recorded kd and a served teacher
    teacher_paths = [path for _, path in teachers]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padded positions carry no loss; any id works
    tokenizer.chat_template = saved_template
    stop_ids = set_stop_tokens(model, tokenizer, end_of_turn)

    conversations = load_conversations(cfg.dataset)
    if cfg.max_examples is not None:
        conversations = conversations.select(range(min(cfg.max_examples, len(conversations))))
    callbacks = [InputsFingerprintCallback(fingerprint), *(callbacks or [])]
    padding_side = tokenizer.padding_side  # on_policy sets it left for generation; saved as it was
    loss_head = cfg.loss_head if cfg.loss_head != "auto" else ("fused" if on_accelerator() else "compact")
    if cfg.method == "on_policy":
        train_dataset = prompts_dataset(conversations, functools.partial(
            reply_tokens, tokenizer, train_template, cfg, end_of_turn))
        teacher = teachers[0][0] if teachers else None  # on_policy takes one teacher
        trainer = on_policy_trainer(cfg, model, teacher, sft_args, train_dataset, tokenizer, callbacks)
    else:
        # Every rank tokenizes for itself, in memory: nothing is written next to the curated dataset.
        max_length = cfg.sft.get("max_length", SFTConfig.max_length)
        reply_from_record = None
        if recorded:
            vocab_size = model.get_output_embeddings().weight.shape[0]
            reply_from_record = functools.partial(recorded_reply, tokenizer, end_of_turn=end_of_turn,
                                                  vocab_size=vocab_size)
        train_dataset = tokenize_conversations(conversations, tokenizer, train_template, cfg, end_of_turn,
                                               max_length, sft_args.dataset_num_proc, reply_from_record)
        if len(train_dataset) == 0:
            raise TrainError(f"{cfg.dataset}: no example fits max_length {max_length}")
        loss_head = "compact" if cfg.method == "kd" else loss_head  # kd's chunked loss runs on the compact head
        trainer = DistillSFTTrainer(model=model, args=sft_args, train_dataset=train_dataset,
                                    processing_class=tokenizer, peft_config=lora_config(cfg), loss_head=loss_head,
                                    token_metrics=cfg.token_metrics, callbacks=callbacks,
                                    teacher=[model for model, _ in teachers] or None, kd=cfg.kd)
    if resume_from:
        logger.info("resuming from %s", resume_from)
    result = trainer.train(resume_from_checkpoint=resume_from)
    tokenizer.padding_side = padding_side  # on_policy generation pads prompts left; the saved tokenizer keeps its own
    sharded = trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled  # these save in their own (16-bit) format
    if cfg.lora is None and save_dtype is not None and not sharded:
        trainer.accelerator.unwrap_model(trainer.model).to(save_dtype)  # training is over: master weights served
    trainer.save_model(str(output_dir))  # every rank: ZeRO-3 / FSDP gather the weights collectively

    if is_main:  # save_model wrote the tokenizer (chat template included); adapters come without generation_config
        trainer.accelerator.unwrap_model(trainer.model).generation_config.save_pretrained(str(output_dir))
        model_dir = output_dir if cfg.lora is None else None
        if cfg.merge:
            model_dir = merge_adapter(output_dir, output_dir / "merged")
        extra = {"model_dir": str(model_dir) if model_dir else None, "adapter": cfg.lora is not None,
                 "student": student_path, "resumed_from": resume_from, "train_loss": result.training_loss,
                 "end_of_turn_token": tokenizer.convert_ids_to_tokens(end_of_turn), "eos_token_ids": stop_ids,
                 "loss_head": loss_head, "assistant_mask": cfg.assistant_mask, "world_size": sft_args.world_size,
                 "inputs_fingerprint": fingerprint["digest"], **run_cost(result.metrics)}
        layer_scores = Path(student_path) / LAYER_SCORES
        if cfg.init_from is not None and layer_scores.exists():  # keep: auto: the layers kept, and why
            extra["layer_choice"] = read_json(layer_scores)
        if cfg.method == "kd":  # sft manifests keep their keys
            extra.update(method="kd", teacher=teacher_paths[0] if len(teacher_paths) == 1 else cfg.kd.teacher)
            if len(teacher_paths) > 1:  # a mixture: each teacher's folder and weight
                extra["teachers"] = [{"path": path, "weight": weight}
                                     for path, (_, weight) in zip(teacher_paths, cfg.kd.teacher_models())]
        if cfg.method == "on_policy":
            served = cfg.on_policy.served
            extra.update(method="on_policy", teacher=teacher_paths[0] if teacher_paths
                         else f"{served.model} at {served.base_url}",
                         loss_head=None)
            if served is not None:
                extra["teacher_requests"] = trainer.scorer.requests
        write_manifest(
            output_dir, stage="train", recipe=recipe_snapshot, files=_output_files(output_dir),
            counts={"examples": len(conversations), "trained_examples": len(train_dataset),
                    "global_step": trainer.state.global_step},
            extra=extra,
        )
    trainer.accelerator.wait_for_everyone()
    return output_dir


def run_cost(metrics: dict[str, float]) -> dict[str, float | None]:
    """What this run of train() cost, from transformers' speed metrics (a resumed run counts only its own steps) and
    this process's peak memory: resident set on CPU (a live teacher's weights included), allocated on CUDA."""
    import resource

    import torch

    steps_per_second = metrics.get("train_steps_per_second") or 0
    cost = {"train_runtime_s": metrics.get("train_runtime"),
            "seconds_per_step": round(1 / steps_per_second, 3) if steps_per_second else None,
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3)}  # Linux: KiB
    if torch.cuda.is_available():
        cost["peak_cuda_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 1024**3, 3)
    return cost


def reply_tokens(tokenizer, template: str, cfg: TrainSection, end_of_turn: int, row: dict, index: int) -> list[int]:
    """The row's reply as sft trains it (through its stop token): on_policy's off-policy batches train on it."""
    messages, _ = normalize_messages(row["messages"], cfg.reasoning_format)
    try:
        _, labels, _ = encode_conversation(tokenizer, template, messages, "final_turn", end_of_turn)
    except ValueError as error:
        raise type(error)(f"row {index}: {error}") from error
    return [token for token in labels if token != IGNORE]


def on_policy_trainer(cfg: TrainSection, model, teacher, args, train_dataset, tokenizer, callbacks):
    """TRL's DistillationTrainer (train/on_policy.py) with the student we built; prompts are left-padded, as its
    generation needs."""
    on_policy = cfg.on_policy
    scorer = ServedTeacherScorer(on_policy.served) if on_policy.served is not None else None
    if scorer is not None:
        scorer.check_tokenizer(tokenizer)  # in seconds, before the trainer (and any vLLM of its own) starts
    tokenizer.padding_side = "left"  # restored once training is over (run_train)
    return OnPolicyTrainer(model=model, teacher_model=teacher, args=args, train_dataset=train_dataset,
                           processing_class=tokenizer, peft_config=lora_config(cfg), callbacks=callbacks,
                           share=on_policy.share, scorer=scorer, kl=on_policy.kl, chunk_tokens=on_policy.chunk_tokens)


def load_train_section(path: str | Path) -> TrainSection:
    """A TrainSection from a YAML/JSON file holding just the train section (or a full recipe with a `train` key)."""
    import yaml

    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))  # JSON is YAML
    if isinstance(data, dict) and "train" in data and "output_dir" not in data:
        data = data["train"]
    return TrainSection.model_validate(data)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m cot_distill.train TRAIN_SECTION.{yaml,json}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_train_section(argv[0])
    run_train(cfg, recipe_snapshot={"train": cfg.model_dump(mode="json")})
    print(f"cot_distill.train: rank {os.environ.get('RANK', '0')} done", flush=True)  # launchers' logs show each rank
    finish_rank()


def run(recipe: Recipe, *, slot=None) -> Path:
    """The uniform stage entry: train `recipe.train` (its dataset defaults to the curate stage's) and return its
    output folder. `slot` (a teachers.serve.ServerSlot elsewhere) is accepted for the signature all stages share
    and unused: training launches no server."""
    from cot_distill.curate import DATASET_DIR  # here: importing train must not import the curate stage

    if recipe.train is None:
        raise TrainError("the recipe has no train section")
    if recipe.chain is not None:  # the train section alone is none of the chain's students
        raise TrainError("the recipe has a chain: its stages train with `cot-distill run` (each stage after the first "
                         "learns from traces the stage before it writes, served); to train the train section alone, "
                         "add --set chain=null")
    cfg = recipe.train
    if cfg.dataset is None:
        cfg = cfg.model_copy(update={"dataset": str(Path(recipe.curate.output_dir) / DATASET_DIR)})
    return run_train(cfg, recipe_snapshot(recipe))
