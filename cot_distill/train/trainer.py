"""The trainer: TRL's SFTTrainer with a compact LM head (logits only where there is loss) and, for method: kd,
the teacher's distribution matched on the same tokens (see cot_distill/kd.py)."""

from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F
from accelerate.utils import is_peft_model
from trl import SFTTrainer
from trl.trainer.utils import add_fused_lm_head

from cot_distill.config.train import KDSection
from cot_distill.kd import (
    DistillationSums,
    chunked_distillation_sums,
    chunked_sparse_distillation_sums,
    weighted_distillation_loss,
)
from cot_distill.train.masking import IGNORE, TrainError
from cot_distill.train.recorded import TEACHER_COLUMNS, TOPK_IDS, TOPK_LOGPROBS, RecordedLogprobsCollator

# Config attributes that make a model scale or cap its logits; the compact head does not replicate them.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")


def logit_transforms(model) -> list[str]:
    """The config keys by which `model` scales or caps its logits (empty for Qwen and Llama)."""
    text_config = model.config.get_text_config()
    return [key for key in _LOGIT_TRANSFORMS if getattr(text_config, key, None) is not None]


def refuse_logit_transforms(model, name: str, method: str) -> None:
    """The chunked distillation heads (kd.py) project hidden states themselves and would skip a model's own logit
    scaling or soft-capping (Gemma-2, Granite, Falcon-H1...): the distribution trained would not be the model's."""
    transforms = logit_transforms(model)
    if transforms:
        raise TrainError(f"{method} does not support a {name} whose config scales its logits ({transforms})")


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
    number an sft run logs as `loss`) and `kl_loss` (token-mean KL at temperature tau), the total as `loss`.
    With kd.teacher: recorded there is no teacher model: the batches carry the teacher's recorded top-K rows
    (train/recorded.py) and the KL is the sparse one (kd.sparse_distillation_sums), logged the same way."""

    def __init__(self, *args, loss_head: str = "compact", token_metrics: bool = False, teacher=None,
                 kd: KDSection | None = None, **kwargs):
        self.recorded = kd is not None and kd.recorded
        super().__init__(*args, **kwargs)
        self.token_metrics = token_metrics
        self.loss_head = "fused" if logit_transforms(self.model) else loss_head  # TRL's kernel applies them
        # `teacher`: one model, or a list whose mixture (weights from kd.teacher_models()) is the teacher
        self.teachers, self.kd = [], kd
        for model in ([] if teacher is None else teacher if isinstance(teacher, (list, tuple)) else [teacher]):
            self._check_distillation_supported(model)
            self.loss_head = "compact"
            self.teachers.append(self._place_teacher(model))
        self.teacher_weights = [weight for _, weight in kd.teacher_models()] if self.teachers else None
        if self.recorded:
            self._check_distillation_supported(None)
            vocab_size = self.model.get_output_embeddings().weight.shape[0]
            self.loss_head, self.data_collator = "compact", RecordedLogprobsCollator(self.data_collator, vocab_size)
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
        models = [("student", self.model)] + ([("teacher", teacher)] if teacher is not None else [])
        for name, model in models:
            refuse_logit_transforms(model, name, "method: kd")

    def _place_teacher(self, teacher):
        """Frozen, in eval mode, on the student's device; never seen by the optimizer or DDP. Under DeepSpeed it is
        initialized for inference the way TRL's GKDTrainer does it (ZeRO-3: sharded like the student)."""
        teacher.eval().requires_grad_(False)
        if self.is_deepspeed_enabled:
            from trl.models.utils import prepare_deepspeed

            engine = prepare_deepspeed(teacher, self.accelerator)
            self._teacher_engines = [*getattr(self, "_teacher_engines", []), engine]  # keeps ZeRO-3's hooks alive
            return engine.module
        return teacher.to(self.accelerator.device)

    def _uses_trl_loss(self) -> bool:
        parallelism = getattr(self.accelerator, "parallelism_config", None)
        return bool(
            self.token_metrics or self.compute_loss_func is not None or self.label_smoother is not None
            or self.args.loss_type != "nll" or self.aux_loss_enabled
            or (parallelism is not None and parallelism.sp_enabled)
        )

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.recorded and self._signature_columns is not None:  # the collator needs each row's record link
            self._signature_columns = list(dict.fromkeys([*self._signature_columns, *TEACHER_COLUMNS]))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.teachers or self.recorded:
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
        model_inputs = {key: value for key, value in inputs.items() if key not in ("labels", TOPK_IDS, TOPK_LOGPROBS)}
        if self.recorded:
            distill = functools.partial(
                chunked_sparse_distillation_sums, topk_ids=inputs[TOPK_IDS], topk_logprobs=inputs[TOPK_LOGPROBS],
                temperature=self.kd.temperature, kl=self.kd.kl, chunk_tokens=self.kd.chunk_tokens)
        else:
            distill = functools.partial(
                chunked_distillation_sums,
                teacher_hidden=[self._teacher_hidden(teacher, model_inputs, inputs["labels"])
                                for teacher in self.teachers],
                teacher_head=[teacher.get_output_embeddings() for teacher in self.teachers],
                teacher_weights=self.teacher_weights, temperature=self.kd.temperature, kl=self.kd.kl,
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

    def _teacher_hidden(self, teacher, model_inputs: dict, labels: torch.Tensor) -> torch.Tensor:
        """A teacher's last hidden states at the positions that carry loss, (scored tokens, hidden): small. Its
        logits are computed from them chunk by chunk inside the student's forward."""
        scored = labels[:, 1:] != IGNORE  # the same selection as add_compact_lm_head's
        with torch.no_grad(), self.accelerator.autocast():  # the student's forward runs under the same autocast
            hidden = teacher.base_model(**model_inputs, use_cache=False).last_hidden_state
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
