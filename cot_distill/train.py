"""Train a student on curated chain-of-thought conversations with TRL's SFTTrainer (method: sft), or distill a
teacher's next-token distributions into it on the same tokens (method: kd, see cot_distill/kd.py).

run_train(cfg, recipe_snapshot) is the one entry: resolve -> write the resolved config -> load the student ->
tokenize with an explicit assistant mask -> train (continuing from the newest checkpoint) -> save model, tokenizer,
chat template, generation_config -> manifest.json last. `python -m cot_distill.train TRAIN_SECTION.yaml` runs the
same function, so `accelerate launch ... -m cot_distill.train ...` trains on many devices unchanged.

Why the tokenization is ours and not TRL's `assistant_only_loss`: with a template lacking `{% generation %}` markers
transformers only *warns* and returns an all-zero mask, and templates that have markers often leave the end-of-turn
token outside them, so the student never learns to stop. Here every example's labels cover exactly the assistant's
tokens through the stop token, and anything else is a ChatTemplateError before training starts.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import types
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import is_peft_model
from trl import SFTConfig, SFTTrainer
from trl.chat_template_utils import get_training_chat_template, has_generation_markers
from trl.trainer.utils import add_fused_lm_head

from .kd import DistillationSums, chunked_distillation_sums, weighted_distillation_loss
from .records import MANIFEST, invalidate_manifest, iter_jsonl, read_json, write_json_atomic, write_manifest
from .reasoning import THINK_CLOSE, THINK_OPEN, split_reasoning
from .train_config import KDSection, TrainSection

logger = logging.getLogger(__name__)

IGNORE = -100
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
# For students without a template of their own. Generation markers wrap the reply and its <|im_end|>, so it also
# serves assistant_mask: generation_markers.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}"
    "{%- if message.reasoning_content is string %}"
    "{{- '<think>\\n' + message.reasoning_content.strip('\\n') + '\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{{- message.content + '<|im_end|>' }}"
    "{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_PROBE = [{"role": "user", "content": "Probe question?"}, {"role": "assistant", "content": "Probe answer."}]


class ChatTemplateError(ValueError):
    """The chat template cannot produce a correct assistant-only loss mask."""


# ---------------------------------------------------------------------------------------------- data and messages


def load_conversations(path: str):
    """A curated dataset as a datasets.Dataset: a save_to_disk folder, or a .jsonl/.json/.parquet file."""
    from datasets import Dataset, DatasetDict, load_from_disk

    source = Path(path)
    if source.is_dir():
        dataset = load_from_disk(str(source))
        dataset = dataset["train"] if isinstance(dataset, DatasetDict) else dataset
    elif source.suffix in (".jsonl", ".json"):
        with open(source, "rb") as handle:
            is_array = handle.read(256).lstrip()[:1] == b"["
        dataset = Dataset.from_list(read_json(source) if is_array else [row for _, row in iter_jsonl(source)])
    elif source.suffix == ".parquet":
        import pyarrow.parquet as pq

        dataset = Dataset.from_list(pq.read_table(source).to_pylist())
    else:
        raise ValueError(f"{path}: expected a save_to_disk folder or a .jsonl/.json/.parquet file")
    if "messages" not in dataset.column_names:
        raise ValueError(f"{path}: no `messages` column (columns: {dataset.column_names})")
    return dataset


def normalize_messages(messages: list[dict], reasoning_format: str) -> tuple[list[dict], str | None]:
    """Put each assistant turn's reasoning in the form the template expects. Returns the messages and the final
    turn's reasoning, which must survive rendering (some templates silently strip <think> blocks)."""
    normalized, final_reasoning = [], None
    for message in messages:
        message = {key: value for key, value in message.items() if value is not None}  # Arrow fills absent keys
        if message.get("role") == "assistant":
            content = message.get("content") or ""
            reasoning = message.pop("reasoning_content", None)
            if reasoning is None and THINK_CLOSE in content:
                reasoning, content = split_reasoning(content)[:2]
            final_reasoning = reasoning.strip() if reasoning and reasoning.strip() else None
            if final_reasoning is None:
                message["content"] = content
            elif reasoning_format == "think_tags":
                message["content"] = f"{THINK_OPEN}\n{final_reasoning}\n{THINK_CLOSE}\n\n{content.lstrip()}"
            else:
                message["content"], message["reasoning_content"] = content.lstrip(), final_reasoning
        normalized.append(message)
    return normalized, final_reasoning


# ------------------------------------------------------------------------------------- chat template and masking


def resolve_chat_template(tokenizer, cfg: TrainSection) -> tuple[str, str]:
    """(template to train with, template to save with the model). The saved one is the student's own when it has
    one, so that inference renders prompts exactly as the student's users and servers expect."""
    own = tokenizer.chat_template["default"] if isinstance(tokenizer.chat_template, dict) else tokenizer.chat_template
    if cfg.chat_template:
        chosen = Path(cfg.chat_template).read_text(encoding="utf-8")
        return chosen, chosen
    if own is None:
        return CHATML_TEMPLATE, CHATML_TEMPLATE
    if cfg.assistant_mask == "final_turn" or has_generation_markers(own):
        return own, own
    try:
        training = get_training_chat_template(tokenizer)
    except ValueError:
        training = None
    if training is None:
        raise ChatTemplateError(
            "assistant_mask: generation_markers needs {% generation %} markers, and the student's chat template has "
            "none (nor does TRL ship a training variant of it). transformers would only warn and return an all-zero "
            "mask. Use assistant_mask: final_turn (works with any template), or set train.chat_template to a copy of "
            "the template with {% generation %}...{% endgeneration %} around each reply and its end-of-turn token."
        )
    return training, own


def _render(tokenizer, template: str, messages: list[dict], **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)


def _encode(tokenizer, text: str) -> list[int]:
    # Templates write their own BOS; add_special_tokens would double it (vLLM tokenizes chat prompts the same way).
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _is_blank(tokenizer, token_id: int) -> bool:
    return tokenizer.decode([token_id]).strip() == ""


def _strip_trailing_blanks(tokenizer, ids: list[int], end: int, stop_id: int) -> int:
    """Where a turn really ends: drop whitespace the template writes after its stop token (Qwen's '\\n' after
    <|im_end|>), which the model never generates because it stopped."""
    while end > 0 and ids[end - 1] != stop_id and _is_blank(tokenizer, ids[end - 1]):
        end -= 1
    return end


def _final_turn_split(tokenizer, template: str, messages: list[dict]) -> tuple[str, str]:
    """(prompt text as rendered for inference, text the model must generate after it)."""
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("the last message of a training conversation must be the assistant's")
    prompt = _render(tokenizer, template, messages[:-1], add_generation_prompt=True)
    full = _render(tokenizer, template, messages)
    if not full.startswith(prompt):
        at = next((i for i, (a, b) in enumerate(zip(prompt, full)) if a != b), len(prompt))
        raise ChatTemplateError(
            f"the template renders the prompt differently once the reply follows (first difference at char {at}: "
            f"{prompt[at:at + 40]!r} vs {full[at:at + 40]!r}); training would not match inference"
        )
    return prompt, full[len(prompt):]


def find_end_of_turn(tokenizer, template: str, assistant_mask: str) -> int:
    """The token that ends an assistant turn under this template, found by rendering a probe conversation: the last
    non-blank token of the reply when it is a special/added token, else the tokenizer's EOS (then appended)."""
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    if assistant_mask == "generation_markers":
        rendered = tokenizer.apply_chat_template(
            _PROBE, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        reply = [t for t, m in zip(rendered["input_ids"], rendered["assistant_masks"]) if m]
        if not reply:
            raise ChatTemplateError("the template's {% generation %} markers mark no assistant token")
    else:
        reply = _encode(tokenizer, _final_turn_split(tokenizer, template, _PROBE)[1])
    last = next((t for t in reversed(reply) if not _is_blank(tokenizer, t)), None)
    if last in special:
        return last
    if assistant_mask == "generation_markers":
        raise ChatTemplateError(
            "the template's {% generation %} block ends on content, not on an end-of-turn token: the student would "
            "never be trained to stop. Move {% endgeneration %} after the end-of-turn token."
        )
    if tokenizer.eos_token_id is None:
        raise ChatTemplateError("the template leaves the assistant turn open and the tokenizer has no EOS token")
    return tokenizer.eos_token_id


def encode_conversation(tokenizer, template: str, messages: list[dict], assistant_mask: str,
                        end_of_turn: int) -> tuple[list[int], list[int], str]:
    """(input_ids, labels, rendered text): labels are the token ids on assistant tokens through the stop token and
    IGNORE everywhere else."""
    if assistant_mask == "final_turn":
        prompt, reply = _final_turn_split(tokenizer, template, messages)
        prompt_ids, reply_ids = _encode(tokenizer, prompt), _encode(tokenizer, reply)
        reply_ids = reply_ids[: _strip_trailing_blanks(tokenizer, reply_ids, len(reply_ids), end_of_turn)]
        if not reply_ids or reply_ids[-1] != end_of_turn:
            reply_ids.append(end_of_turn)  # the template leaves the final turn open: the student must still stop
        return prompt_ids + reply_ids, [IGNORE] * len(prompt_ids) + reply_ids, reply
    rendered = tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = list(rendered["input_ids"]), list(rendered["assistant_masks"])
    labels = [token if masked else IGNORE for token, masked in zip(ids, mask)]
    span_ends = [i + 1 for i in range(len(mask)) if mask[i] and (i + 1 == len(mask) or not mask[i + 1])]
    for end in span_ends:
        real_end = _strip_trailing_blanks(tokenizer, ids, end, end_of_turn)
        labels[real_end:end] = [IGNORE] * (end - real_end)
        if real_end == 0 or ids[real_end - 1] != end_of_turn:
            raise ChatTemplateError("an assistant span of the template does not end with its end-of-turn token")
    if not span_ends:
        raise ChatTemplateError("the template's {% generation %} markers mark no assistant token in a conversation")
    return ids, labels, _render(tokenizer, template, messages)


def tokenize_conversations(dataset, tokenizer, template: str, cfg: TrainSection, end_of_turn: int,
                           max_length: int | None, num_proc: int | None):
    """Dataset of messages -> Dataset of input_ids/labels (+ length), overlong rows dropped or truncated."""

    def encode_row(row: dict, index: int) -> dict:
        messages, reasoning = normalize_messages(row["messages"], cfg.reasoning_format)
        try:
            ids, labels, rendered = encode_conversation(tokenizer, template, messages, cfg.assistant_mask,
                                                        end_of_turn)
        except ValueError as error:
            raise type(error)(f"row {index}: {error}") from error
        if reasoning and reasoning[:64] not in rendered:
            raise ChatTemplateError(
                f"row {index}: the chat template dropped the reasoning of the final reply (some templates strip "
                f"<think> blocks); try train.reasoning_format: reasoning_content or a train.chat_template that keeps it"
            )
        if cfg.overlong == "truncate" and max_length is not None:
            ids, labels = ids[:max_length], labels[:max_length]
        return {"input_ids": ids, "labels": labels, "length": len(ids)}

    tokenized = dataset.map(encode_row, with_indices=True, remove_columns=dataset.column_names,
                            keep_in_memory=True, num_proc=num_proc, desc="Tokenizing conversations")
    if cfg.overlong == "drop" and max_length is not None:
        tokenized = tokenized.filter(lambda length: length <= max_length, input_columns="length", keep_in_memory=True)
    return tokenized.remove_columns("length")


# ------------------------------------------------------------------------------------------------------ trainer


# Config attributes that make a model scale or cap its logits; the compact head does not replicate them.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")


def add_compact_lm_head(model) -> None:
    """Patch model.forward: `model(..., compact_labels=labels)` returns (summed NLL, number of scored tokens), with
    the LM head applied only to the positions whose next token carries loss, gathered across the batch (prompt and
    padding positions never reach the vocabulary projection), then one fp32 cross-entropy. With `distill` too,
    returns distill(hidden states at those positions, their targets, the LM head) instead (knowledge distillation:
    the head must run inside this forward, where DDP, ZeRO-3 and FSDP expect its weights to be used). Without
    compact_labels the forward is unchanged. Patch the base model (under any PEFT wrapper): DDP and PEFT call into
    it."""
    original_forward = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, compact_labels=None, distill=None, **kwargs):
        if compact_labels is None:
            return original_forward(*args, **kwargs)
        hidden = self.base_model(*args, use_cache=False, **kwargs).last_hidden_state
        targets = compact_labels[:, 1:]  # position t predicts token t + 1
        scored = targets != IGNORE
        if distill is not None:
            return distill(hidden[:, :-1][scored], targets[scored], self.get_output_embeddings())
        logits = self.get_output_embeddings()(hidden[:, :-1][scored])
        return F.cross_entropy(logits.float(), targets[scored], reduction="sum"), scored.sum()

    model.forward = types.MethodType(forward, model)


class DistillSFTTrainer(SFTTrainer):
    """TRL's SFTTrainer without its per-step extras. TRL 1.16 computes, every step, the entropy and top-1 accuracy
    over the whole vocabulary, and on devices without Triton its chunked LM head scores every position (prompt and
    padding too) and recomputes the vocabulary projection in backward (measured ~10x the plain head on CPU). The
    loss here is the same token-mean NLL, computed by
      - loss_head "compact": add_compact_lm_head (cheapest on CPU; materializes logits for the scored tokens);
      - loss_head "fused": TRL's chunked kernel restricted to log-probs (never materializes logits: long GPU runs).
    token_metrics=True keeps TRL's compute_loss and its metrics exactly as they are.

    With a `teacher` (method: kd) the loss is cot_distill.kd's alpha * CE + beta * tau^2 * KL on the same tokens,
    always on the compact head, chunk by chunk; the unweighted parts are logged as `ce_loss` (token-mean NLL, the
    number an sft run logs as `loss`) and `kl_loss` (token-mean KL at temperature tau), the total as `loss`."""

    def __init__(self, *args, loss_head: str = "compact", token_metrics: bool = False, teacher=None,
                 kd: KDSection | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.token_metrics = token_metrics
        text_config = self.model.config.get_text_config()
        scales_logits = any(getattr(text_config, name, None) is not None for name in _LOGIT_TRANSFORMS)
        self.loss_head = "fused" if scales_logits else loss_head  # TRL's kernel applies those transforms
        self.teacher, self.kd = None, kd
        if teacher is not None:
            self._check_distillation_supported(teacher)
            self.loss_head, self.teacher = "compact", self._place_teacher(teacher)
        if token_metrics:
            return
        base = self.model.get_base_model() if is_peft_model(self.model) else self.model
        if "forward" in vars(base):
            del base.forward  # TRL's fused-head patch is an instance attribute; patch the class forward instead
        if self.loss_head == "fused":
            add_fused_lm_head(base, outputs=("log_probs",))  # without the entropy and top-1 passes
        else:
            add_compact_lm_head(base)

    def _check_distillation_supported(self, teacher) -> None:
        if self.kd is None:
            raise ValueError("a teacher needs its kd settings (DistillSFTTrainer(..., kd=KDSection(...)))")
        if self._uses_trl_loss():
            raise ValueError("method: kd replaces TRL's loss, so it cannot honour token_metrics, sft.loss_type other "
                             "than nll, label smoothing, a compute_loss_func, sequence parallelism or a MoE router "
                             "aux loss")
        for name, model in (("student", self.model), ("teacher", teacher)):
            text_config = model.config.get_text_config()
            transforms = [key for key in _LOGIT_TRANSFORMS if getattr(text_config, key, None) is not None]
            if transforms:  # the chunked head projects hidden states itself and would skip them
                raise ValueError(f"method: kd does not support a {name} whose config scales its logits ({transforms})")

    def _place_teacher(self, teacher):
        """Frozen, in eval mode, on the student's device; never seen by the optimizer or DDP. Under DeepSpeed it is
        initialized for inference the way TRL's GKDTrainer does it (ZeRO-3: sharded like the student)."""
        teacher.eval().requires_grad_(False)
        if self.is_deepspeed_enabled:
            from trl.models.utils import prepare_deepspeed

            self._teacher_engine = prepare_deepspeed(teacher, self.accelerator)  # keeps ZeRO-3's hooks alive
            return self._teacher_engine.module
        return teacher.to(self.accelerator.device)

    def _uses_trl_loss(self) -> bool:
        parallelism = getattr(self.accelerator, "parallelism_config", None)
        return bool(
            self.token_metrics or self.compute_loss_func is not None or self.label_smoother is not None
            or self.args.loss_type != "nll" or self.aux_loss_enabled
            or (parallelism is not None and parallelism.sp_enabled)
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.teacher is not None:
            return self._distillation_loss(model, inputs, return_outputs, num_items_in_batch)
        if return_outputs or self._uses_trl_loss():
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.loss_head == "fused":
            outputs = model(**inputs, use_cache=False, fused_lm_head=True)
            nll_sum, local_count = -outputs.log_probs.sum(), outputs.label_mask.sum()
        else:
            model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
            nll_sum, local_count = model(**model_inputs, compact_labels=inputs["labels"])
        count = local_count if num_items_in_batch is None else num_items_in_batch
        loss = nll_sum / torch.as_tensor(count).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # count spans all ranks while DDP averages gradients
        if self.model.training:
            self._count_tokens(inputs)
        return loss

    def _distillation_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
        distill = functools.partial(
            chunked_distillation_sums, teacher_hidden=self._teacher_hidden(model_inputs, inputs["labels"]),
            teacher_head=self.teacher.get_output_embeddings(), temperature=self.kd.temperature, kl=self.kd.kl,
            chunk_tokens=self.kd.chunk_tokens,
        )
        sums = DistillationSums(*model(**model_inputs, compact_labels=inputs["labels"], distill=distill))
        loss = weighted_distillation_loss(sums, self.kd.alpha, self.kd.beta, self.kd.temperature,
                                          num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # count spans all ranks while DDP averages gradients
        self._log_distillation_parts(sums)
        if self.model.training:
            self._count_tokens(inputs)
        if not return_outputs:
            return loss
        with torch.no_grad():  # only evaluation with compute_metrics asks for the logits
            return loss, model(**model_inputs)

    def _teacher_hidden(self, model_inputs: dict, labels: torch.Tensor) -> torch.Tensor:
        """The teacher's last hidden states at the positions that carry loss, (scored tokens, hidden): small. Its
        logits are computed from them chunk by chunk inside the student's forward."""
        scored = labels[:, 1:] != IGNORE  # the same selection as add_compact_lm_head's
        with torch.no_grad(), self.accelerator.autocast():  # the student's forward runs under the same autocast
            hidden = self.teacher.base_model(**model_inputs, use_cache=False).last_hidden_state
        return hidden[:, :-1][scored]

    def _log_distillation_parts(self, sums: DistillationSums) -> None:
        """Token means over all ranks, appended where TRL's log() averages them into each logging step."""
        local = torch.stack([sums.ce.detach(), sums.kl.detach(), sums.count.to(sums.ce.dtype)]).reshape(1, 3)
        ce, kl, count = self.accelerator.gather(local).sum(dim=0).tolist()
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["ce_loss"].append(ce / max(count, 1))
        self._metrics[mode]["kl_loss"].append(kl / max(count, 1))

    def _count_tokens(self, inputs: dict) -> None:
        local = inputs["attention_mask"].sum() if "attention_mask" in inputs else torch.tensor(inputs["input_ids"].numel())
        self._total_train_tokens += int(self.accelerator.gather_for_metrics(local.reshape(1)).sum())
        self._metrics["train"]["num_tokens"] = [self._total_train_tokens]


# ------------------------------------------------------------------------------------------------------- setup


def _on_accelerator() -> bool:
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
    if not _on_accelerator():
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
    from .student_init import ensure_student_init, student_init_dir

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
        raise ValueError(f"method: kd needs the teacher and the student to share one vocabulary, but the student "
                         f"({student_path}) has vocab_size {student_size} and the teacher ({teacher_path}) has "
                         f"vocab_size {teacher_size}")
    try:
        teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    except (OSError, ValueError):
        return  # a teacher saved without a tokenizer: the logits width is all there is to compare
    if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise ValueError(f"method: kd needs the same tokenizer: the student ({student_path}) and the teacher "
                         f"({teacher_path}) both have vocab_size {student_size} but map tokens to different ids")


def load_teacher(cfg: TrainSection, student, student_tokenizer, student_path: str) -> tuple[Any, str]:
    """(frozen teacher in the student's dtype, its resolved path) for method: kd, after the vocabulary check."""
    from transformers import AutoModelForCausalLM

    from .teachers.serve import resolve_model_path

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


def _output_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and p.name != MANIFEST
                  and not p.relative_to(folder).parts[0].startswith(("checkpoint-", "student_init")))


# -------------------------------------------------------------------------------------------------------- entry


def run_train(cfg: TrainSection, recipe_snapshot: dict[str, Any], *, callbacks: list | None = None) -> Path:
    """Train cfg's student on cfg.dataset; returns OUTPUT_DIR, which holds the model (or adapter, and with merge a
    merged model in OUTPUT_DIR/merged) and, written last, manifest.json. `callbacks`: extra transformers
    TrainerCallbacks (progress reporting, benchmarks, tests)."""
    if cfg.dataset is None:
        raise ValueError("train.dataset is not set")
    output_dir = Path(cfg.output_dir)
    sft_args = build_sft_config(cfg)
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
    model, tokenizer = load_student(cfg, student_path)
    save_dtype = checkpoint_dtype(cfg, student_path)
    train_template, saved_template = resolve_chat_template(tokenizer, cfg)
    ensure_chatml_tokens(model, tokenizer, train_template, lora=cfg.lora is not None)
    end_of_turn = find_end_of_turn(tokenizer, train_template, cfg.assistant_mask)
    # Loaded before the data so that a wrong teacher fails in seconds; after ensure_chatml_tokens, which may grow
    # the student's vocabulary.
    teacher, teacher_path = load_teacher(cfg, model, tokenizer, student_path) if cfg.method == "kd" else (None, None)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padded positions carry no loss; any id works
    tokenizer.chat_template = saved_template
    stop_ids = set_stop_tokens(model, tokenizer, end_of_turn)

    conversations = load_conversations(cfg.dataset)
    if cfg.max_examples is not None:
        conversations = conversations.select(range(min(cfg.max_examples, len(conversations))))
    # Every rank tokenizes for itself, in memory: nothing is written next to the curated dataset.
    max_length = cfg.sft.get("max_length", SFTConfig.max_length)
    train_dataset = tokenize_conversations(conversations, tokenizer, train_template, cfg, end_of_turn, max_length,
                                           sft_args.dataset_num_proc)
    if len(train_dataset) == 0:
        raise ValueError(f"{cfg.dataset}: no example fits max_length {max_length}")

    loss_head = cfg.loss_head if cfg.loss_head != "auto" else ("fused" if _on_accelerator() else "compact")
    loss_head = "compact" if teacher is not None else loss_head  # kd's chunked loss runs on the compact head
    trainer = DistillSFTTrainer(model=model, args=sft_args, train_dataset=train_dataset, processing_class=tokenizer,
                                peft_config=lora_config(cfg), loss_head=loss_head, token_metrics=cfg.token_metrics,
                                callbacks=callbacks, teacher=teacher, kd=cfg.kd)
    resume_from = newest_complete_checkpoint(cfg.output_dir) if cfg.resume else None
    if resume_from:
        logger.info("resuming from %s", resume_from)
    result = trainer.train(resume_from_checkpoint=resume_from)
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
                 "loss_head": loss_head, "assistant_mask": cfg.assistant_mask, "world_size": sft_args.world_size}
        if teacher is not None:  # sft manifests keep their keys
            extra.update(method="kd", teacher=teacher_path)
        write_manifest(
            output_dir, stage="train", recipe=recipe_snapshot, files=_output_files(output_dir),
            counts={"examples": len(conversations), "trained_examples": len(train_dataset),
                    "global_step": trainer.state.global_step},
            extra=extra,
        )
    trainer.accelerator.wait_for_everyone()
    return output_dir


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


if __name__ == "__main__":
    main()
