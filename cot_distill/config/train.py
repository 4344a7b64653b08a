"""The `train` section of a recipe: which student, which data, and how to run TRL's SFT (or distillation) on it.

Only pydantic here (no torch/transformers/trl imports), so the recipe can be validated in milliseconds. TRL's own
options are not re-declared: `sft` is passed verbatim to `trl.SFTConfig(**sft)`, which rejects unknown keys itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_serializer, model_validator

from cot_distill.config.base import Strict

# SFTConfig keys this tool decides itself; accepting them in `sft` would silently do the wrong thing.
_RESERVED_SFT_KEYS = {
    "output_dir": "set `train.output_dir` instead",
    "assistant_only_loss": "the loss mask is built by cot_distill (see `train.assistant_mask`), always assistant-only",
    "completion_only_loss": "the loss mask is built by cot_distill (see `train.assistant_mask`), always assistant-only",
    "dataset_text_field": "the dataset is tokenized from its `messages` column by cot_distill",
    "chat_template_path": "set `train.chat_template` instead",
}


class InitFrom(Strict):
    """Build the student from a teacher's own layers (DistilBERT-style) instead of loading one."""

    model: str  # local path or hub id of the teacher (Llama / Qwen2 / Qwen3 family, or any same-shaped decoder)
    keep_layers: list[int] | None = None  # teacher layer indices to copy, in order
    every: int | None = Field(default=None, ge=1)  # keep layers 0, every, 2*every, ... plus the last one
    # keep: auto keeps the `layers` layers with the highest `score`, measured on the first `calibration_rows`
    # rows of the training data (train/layer_scores.py); the choice and every layer's score go into the manifest.
    keep: Literal["auto"] | None = None
    layers: int | None = Field(default=None, ge=1)
    score: Literal["block_importance", "skip_loss"] = "block_importance"
    calibration_rows: int = Field(default=64, ge=1)
    calibration_max_length: int = Field(default=512, ge=8)

    @model_validator(mode="after")
    def _exactly_one_selector(self) -> "InitFrom":
        chosen = [name for name in ("keep_layers", "every", "keep") if getattr(self, name) is not None]
        if len(chosen) != 1:
            raise ValueError("init_from needs exactly one of `keep_layers`, `every` or `keep: auto`"
                             + (f" (got {', '.join(chosen)})" if chosen else ""))
        if (self.keep is None) != (self.layers is None):
            raise ValueError("init_from.keep: auto needs `layers` (how many to keep), and `layers` needs keep: auto")
        return self

    @model_serializer(mode="wrap")
    def _omit_auto_settings(self, handler) -> dict[str, Any]:
        # Without keep: auto the section dumps as before these keys existed: the student_init record and the
        # pipeline's fingerprints stay the same, so existing students are not rebuilt or retrained.
        data = handler(self)
        if self.keep is None:
            for key in ("keep", "layers", "score", "calibration_rows", "calibration_max_length"):
                data.pop(key, None)
        return data

    @model_validator(mode="after")
    def _layer_indices(self) -> "InitFrom":
        if self.keep_layers is not None:
            if not self.keep_layers:
                raise ValueError("init_from.keep_layers must not be empty")
            if any(index < 0 for index in self.keep_layers) or len(set(self.keep_layers)) != len(self.keep_layers):
                raise ValueError("init_from.keep_layers must be distinct non-negative layer indices")
        return self


class LoraSection(Strict):
    r: int = Field(default=16, ge=1)
    alpha: int = Field(default=32, ge=1)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    # "all-linear": every linear layer except the LM head (TRL refuses an adapter on lm_head: it would not train).
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


RECORDED_TEACHER = "recorded"  # kd.teacher: train from the recorded top-K (logprob_store.py), no teacher model


class WeightedTeacher(Strict):
    model: str  # local path or offline asset name, with the student's exact vocabulary
    weight: float = Field(default=1.0, gt=0)  # relative: the weights are scaled to sum to 1


class KDSection(Strict):
    """method: kd. Loss on the assistant tokens: alpha * CE(labels) + beta * tau^2 * KL at temperature tau, with
    the teacher's full next-token distribution computed on the fly (see cot_distill/kd.py)."""

    # Local path or offline asset name (e.g. smollm2-135m) of a model with the student's exact vocabulary.
    # Default: init_from.model when the student is built with init_from. "recorded": no teacher in memory; the
    # teacher's top-K log-probabilities recorded by generate (generate.logprobs), linked from each dataset row
    # (with `teachers:` in the recipe, each row's own teacher's records).
    teacher: str | None = None
    # Several teachers in memory, distilled as the weighted mixture of their distributions (kd.py), instead of
    # `teacher`: e.g. [{model: runs/a/train, weight: 2}, {model: smollm2-135m, weight: 1}].
    teachers: list[WeightedTeacher] = []
    alpha: float = Field(default=0.5, ge=0.0)  # weight of the cross-entropy on the trace's tokens
    beta: float = Field(default=0.5, ge=0.0)  # weight of tau^2 * KL
    temperature: float = Field(default=2.0, gt=0.0)
    kl: Literal["forward", "reverse"] = "forward"  # forward: KL(teacher || student); reverse: KL(student || teacher)
    # Positions whose logits (student and teacher) exist at once. Batches with more scored tokens recompute each
    # chunk's logits in backward rather than keep them: memory stays at one chunk, for one more LM-head pass.
    chunk_tokens: int = Field(default=1024, ge=1)

    @model_validator(mode="after")
    def _some_weight(self) -> "KDSection":
        if self.alpha == 0 and self.beta == 0:
            raise ValueError("train.kd: alpha and beta are both 0, so nothing would be trained")
        if self.teachers and self.teacher is not None:
            raise ValueError("train.kd: set `teacher` (one) or `teachers` (a weighted mixture), not both")
        if len(self.teachers) == 1:
            raise ValueError("train.kd.teachers: a mixture needs two or more; one teacher goes in `kd.teacher`")
        return self

    @model_serializer(mode="wrap")
    def _omit_no_mixture(self, handler) -> dict[str, Any]:
        # Without a mixture the section dumps as before `teachers` existed: kd students are reused, not retrained.
        data = handler(self)
        if not self.teachers:
            data.pop("teachers", None)
        return data

    def teacher_models(self) -> list[tuple[str, float]]:
        """(model, weight) of each teacher held in memory, weights summing to 1; [] for recorded."""
        if self.recorded:
            return []
        if not self.teachers:
            return [(self.teacher, 1.0)]
        total = sum(teacher.weight for teacher in self.teachers)
        return [(teacher.model, teacher.weight / total) for teacher in self.teachers]

    @property
    def recorded(self) -> bool:
        return self.teacher == RECORDED_TEACHER


class ServedTeacher(Strict):
    """A teacher behind a vLLM OpenAI-compatible server, scoring the student's tokens with prompt_logprobs. Without
    base_url and model: the recipe's teacher, which `cot-distill run` serves for the training (teacher.launch, or
    its first base_url)."""

    base_url: str | None = None  # e.g. http://127.0.0.1:8000/v1
    model: str | None = None  # the served model name
    top_k: int = Field(default=20, ge=1)  # at most the server's --max-logprobs (vLLM's default: 20)
    timeout_s: float = Field(default=300, gt=0)
    api_key_env: str | None = None  # the environment variable holding the endpoint's key (never stored)


class OnPolicySection(Strict):
    """method: on_policy (TRL's DistillationTrainer): the student samples completions of the dataset's prompts, and
    the teacher's distribution on the student's own tokens is the target (see cot_distill/train/on_policy.py)."""

    # Local path or offline asset of a teacher with the student's vocabulary (default: init_from.model), or
    # `served` instead: a server scores the student's tokens (any teacher size; the sparse loss of kd.py).
    teacher: str | None = None
    served: ServedTeacher | None = None
    beta: float = Field(default=0.5, ge=0.0, le=1.0)  # local teacher: TRL's JSD mix (0 forward KL, 1 reverse KL)
    kl: Literal["forward", "reverse"] = "reverse"  # served teacher: the sparse KL's direction
    temperature: float = Field(default=1.0, gt=0.0)  # sampling temperature and the divergence's
    max_completion_length: int = Field(default=256, ge=1)  # tokens the student samples per prompt
    share: float = Field(default=1.0, ge=0.0, le=1.0)  # batches the student generates; the rest use the trace
    chunk_tokens: int = Field(default=1024, ge=1)  # served teacher: positions whose logits exist at once

    @model_validator(mode="after")
    def _served_in_full(self) -> "OnPolicySection":
        if self.served is not None and (self.served.base_url is None) != (self.served.model is None):
            raise ValueError("train.on_policy.served: give both base_url and model, or neither (the recipe's "
                             "teacher, served by `cot-distill run`)")
        return self

    @model_validator(mode="after")
    def _one_teacher(self) -> "OnPolicySection":
        if self.teacher is not None and self.served is not None:
            raise ValueError("train.on_policy: set `teacher` (a local model) or `served` (a server), not both")
        return self


class TrainSection(Strict):
    student: str | None = None  # local path or hub id
    init_from: InitFrom | None = None
    dataset: str | None = None  # save_to_disk folder, or a .jsonl/.json/.parquet file with a `messages` column
    output_dir: str
    # kd: distill from a teacher's logits as well (see `kd`); on_policy: from the teacher's distribution on the
    # student's own samples (see `on_policy`)
    method: Literal["sft", "kd", "on_policy"] = "sft"
    kd: KDSection | None = None  # only with method: kd (absent: the defaults)
    on_policy: OnPolicySection | None = None  # only with method: on_policy (absent: the defaults)
    sft: dict[str, Any] = {}  # verbatim trl.SFTConfig(**sft); for on_policy, trl.DistillationConfig(**sft)
    lora: LoraSection | None = None  # absent: full fine-tune
    merge: bool = False  # with lora: also write a merged full model to OUTPUT_DIR/merged
    # How reasoning reaches the chat template: "think_tags" folds a `reasoning_content` key into the content as
    # <think>...</think>; "reasoning_content" moves <think> blocks out of the content into that key, for templates
    # (Qwen3-style) that render it in their own convention.
    reasoning_format: Literal["think_tags", "reasoning_content"] = "think_tags"
    # Which tokens carry loss. "final_turn": the tokens the model must generate after the template's generation
    # prompt for the last message, ending with the stop token; works with any template. "generation_markers": every
    # assistant turn, from the template's {% generation %} blocks; a template without them is an error.
    assistant_mask: Literal["final_turn", "generation_markers"] = "final_turn"
    chat_template: str | None = None  # path to a .jinja file that replaces the student's template
    overlong: Literal["drop", "truncate"] = "drop"  # rows longer than sft.max_length: truncating loses the stop token
    max_examples: int | None = Field(default=None, ge=1)  # first N rows only (smoke runs)
    # Autocast matmuls to bf16 on CPU while the weights and optimizer stay float32: faster on CPUs with AVX512-BF16
    # or AMX, ~20x slower where bf16 is emulated (AVX2 only; cot_distill.hardware). "auto": on exactly where the CPU
    # has native bf16. Ignored when `sft` sets bf16/fp16 explicitly, and off the CPU.
    bf16_autocast_on_cpu: bool | Literal["auto"] = "auto"
    # On CPU, keep freed memory in glibc's heap instead of returning it to the OS and page-faulting it back every
    # step (about half of a CPU step's LM head time; see train.tune_cpu_allocator). Process-wide; glibc only.
    # None: on for sft, off for kd. kd's many vocabulary-sized temporaries of varying size fragment a heap that is
    # never trimmed: the demo's kd run grew to 24 GB RSS by step 43 (killed), ~5 GB with glibc's defaults.
    tune_cpu_allocator: bool | None = None
    model_dtype: Literal["float32", "bfloat16"] = "float32"  # dtype the student is loaded in (master weights)
    # dtype of the saved full model; "auto": the student checkpoint's own (a bf16 student stays bf16 for vLLM).
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: str | None = None  # e.g. "sdpa", "flash_attention_2"; None = transformers' default
    # "compact": LM head only on the tokens that carry loss, then a plain fp32 cross-entropy (fastest on CPU).
    # "fused": TRL's chunked log-prob kernel (never materializes logits; for long sequences on GPU).
    # "auto": compact on CPU, fused elsewhere.
    loss_head: Literal["auto", "compact", "fused"] = "auto"
    token_metrics: bool = False  # TRL's per-step entropy / token-accuracy logging (costs a pass over the vocabulary)
    # True: continue from the newest complete OUTPUT_DIR/checkpoint-N when it was made from the same student, data
    # and training settings; one made from other inputs moves to OUTPUT_DIR/stale-checkpoints/ and training starts
    # fresh. "force": continue from the newest one whatever made it. False: always start fresh.
    resume: bool | Literal["force"] = True

    @model_validator(mode="after")
    def _one_student_source(self) -> "TrainSection":
        if (self.student is None) == (self.init_from is None):
            raise ValueError("train needs exactly one of `student` or `init_from`")
        if self.merge and self.lora is None:
            raise ValueError("train.merge only applies to LoRA runs (set `train.lora`)")
        return self

    @model_validator(mode="after")
    def _kd_settings(self) -> "TrainSection":
        if self.method != "kd":
            if self.kd is not None:
                raise ValueError("train.kd is set but train.method is sft: set `method: kd` or remove `kd`")
            return self
        self.kd = self.kd or KDSection()
        if self.kd.teacher is None and not self.kd.teachers:
            if self.init_from is None:
                raise ValueError("method: kd needs `train.kd.teacher` (or a student built with `init_from`, whose "
                                 "model is then the teacher)")
            self.kd.teacher = self.init_from.model
        if self.loss_head == "fused":
            raise ValueError("method: kd computes its loss on the compact LM head, chunk by chunk; loss_head: fused "
                             "does not apply (use auto or compact)")
        if self.token_metrics:
            raise ValueError("token_metrics needs TRL's own SFT loss, which method: kd replaces")
        if self.kd.recorded:
            if self.assistant_mask != "final_turn":
                raise ValueError("kd.teacher: recorded trains the final turn on the teacher's recorded tokens; "
                                 "assistant_mask: generation_markers does not apply (use final_turn)")
            if self.sft.get("packing"):
                raise ValueError("kd.teacher: recorded reads each row's records in batch order; sft.packing "
                                 "reorders tokens across rows (padding_free is fine)")
        return self

    @model_validator(mode="after")
    def _on_policy_settings(self) -> "TrainSection":
        if self.method != "on_policy":
            if self.on_policy is not None:
                raise ValueError("train.on_policy is set but train.method is not on_policy")
            return self
        self.on_policy = self.on_policy or OnPolicySection()
        if self.on_policy.teacher is None and self.on_policy.served is None:
            if self.init_from is None:
                raise ValueError("method: on_policy needs `train.on_policy.teacher` or `train.on_policy.served` (or a "
                                 "student built with `init_from`, whose model is then the teacher)")
            self.on_policy.teacher = self.init_from.model
        return self

    @model_serializer(mode="wrap")
    def _omit_absent_kd(self, handler) -> dict[str, Any]:
        # An sft section dumps exactly as before `kd` and `on_policy` existed: its resolved config and the pipeline's
        # fingerprint of it stay the same, so existing train outputs are still reused.
        data = handler(self)
        for key in ("kd", "on_policy"):
            if getattr(self, key) is None:
                data.pop(key, None)
        return data

    def model_dir(self) -> Path:
        """The trained full model, which vLLM serves and quantize reads: OUTPUT_DIR, or OUTPUT_DIR/merged with LoRA
        (with LoRA and no merge there is only an adapter: callers refuse that with their own message)."""
        return Path(self.output_dir) / ("merged" if self.lora is not None else "")

    @field_validator("resume", mode="before")
    @classmethod
    def _resume_choice(cls, value: Any) -> Any:
        # Before pydantic's bool parsing, which would take "yes", "off" or 1 as booleans and report a typo such as
        # "forced" as two errors.
        if isinstance(value, bool) or value == "force":
            return value
        raise ValueError(f"train.resume must be true, false or \"force\", not {value!r}")

    @field_validator("sft")
    @classmethod
    def _no_reserved_keys(cls, sft: dict[str, Any]) -> dict[str, Any]:
        for key, reason in _RESERVED_SFT_KEYS.items():
            if key in sft:
                raise ValueError(f"train.sft.{key} is not accepted: {reason}")
        return sft


class ChainStage(Strict):
    """One student of a teacher-assistant chain: the recipe's train section with these keys replaced (as an
    ablation's are). The first stage learns from the recipe's teacher (its curated traces, or its logits); each later
    stage from the stage before it, whose trained student is served to write traces on the recipe's prompts (with
    the recipe's generate and curate settings) and is the default kd teacher."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    train: dict[str, Any] = {}  # e.g. {init_from: {model: smollm2-135m, every: 3}}; output_dir: CHAIN.OUTPUT_DIR/NAME/train


class ChainSection(Strict):
    """`chain:` teacher -> stages[0] -> stages[1] -> ..., one `cot-distill run`. The last stage is the run's main
    student (student_after); the others are evaluated as student_<name>. compare_direct also trains the last
    stage's student on the recipe teacher's own curated traces (student_direct), the baseline a chain must beat."""

    stages: list[ChainStage] = Field(min_length=1)
    output_dir: str = "runs/chain"  # per stage: NAME/generate, NAME/curate, NAME/train; direct/train
    compare_direct: bool = False

    @model_validator(mode="after")
    def _distinct_names(self) -> "ChainSection":
        names = [stage.name for stage in self.stages]
        if len(set(names)) != len(names) or "direct" in names:
            raise ValueError(f"chain.stages: each needs a name of its own, and not `direct` (got {names})")
        return self
