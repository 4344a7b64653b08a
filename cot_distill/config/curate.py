"""The `curate` section of a recipe: which filters run on the teacher's samples, and how the result is written.

Only pydantic here, so a recipe validates in milliseconds. Every filter can be switched off with
`enabled: false`; the defaults are the usual distillation choices (see cot_distill/curate/ for what each does).

    curate:
      output_dir: runs/curate
      repetition: {ngram: 10, min_repeats: 4, max_coverage: 0.5}
      length: {max_tokens: 16384, tokenizer: Qwen/Qwen3-8B}   # no tokenizer: the sample's usage.completion_tokens
      correctness: {answer_anchor: required}
      near_dup: {threshold: 0.9}
      decontaminate: {extra: [{name: my_eval, path: data/my_eval.jsonl, field: question}]}
      select: {strategy: shortest, k: 2}                       # or just `select: all`

With several teachers (`teachers:`), `select.across_teachers` says whose survivors a prompt's rows come from
(strategy and k then apply to those survivors); any form but `all` needs `teachers:`:

      select: {across_teachers: all}                  # default: every teacher's survivors pooled
      select: {across_teachers: shortest_verified}    # per prompt, the teacher with the shortest survivor
      select: {across_teachers: {prefer: [a, b]}}     # per prompt, the first listed teacher with a survivor
      select: {across_teachers: {quota: {a: 0.7, b: 0.3}}}   # shares of the kept rows
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from cot_distill.config.base import Strict


class CompletenessFilter(Strict):
    """finish_reason == "stop", the reasoning block closed, and some answer text after it."""

    enabled: bool = True


class RepetitionFilter(Strict):
    """Drop degenerate loops: in the last `tail_words` words, the word `ngram`-grams that occur at least
    `min_repeats` times start at least `max_coverage` of the positions. Conservative on purpose: a 10-word span
    repeated 4+ times over half the tail does not happen in healthy reasoning, even with its stock phrases."""

    enabled: bool = True
    tail_words: int = Field(default=1000, ge=10)
    ngram: int = Field(default=10, ge=1, le=32)
    min_repeats: int = Field(default=4, ge=2)
    max_coverage: float = Field(default=0.5, gt=0, le=1)


class LengthFilter(Strict):
    max_tokens: int | None = Field(default=None, ge=1)  # None: no length limit (tokens are still counted)
    # A tokenizer folder or hub id to count the completion's tokens with (transformers.AutoTokenizer);
    # None: trust the sample's usage.completion_tokens, i.e. the teacher's own tokenizer.
    tokenizer: str | None = None


class CorrectnessFilter(Strict):
    """Grade the answer text (after the reasoning) against the prompt's gold answer; keep `correct is True`."""

    enabled: bool = True
    answer_anchor: Literal["required", "lenient"] = "required"  # lenient also accepts the last number
    answer_patterns: list[str] = []  # extra regexes, group 1 = the answer (tried before \boxed{})
    timeout_s: float = Field(default=5.0, gt=0)
    workers: int | None = Field(default=None, ge=1)  # math-verify processes; None: CPU count - 1 (at least 1)
    fast_path: bool = True  # exact arithmetic for plain numbers instead of math-verify (same verdicts)
    memo: bool = True  # reuse the verdict of a repeated (gold, answer) pair


class ExactDedup(Strict):
    """Whitespace- and case-normalized identical completions. Per prompt by default: two prompts may share a
    short answer-only completion legitimately, while the same trace twice for one prompt is wasted weight."""

    enabled: bool = True
    scope: Literal["prompt", "global"] = "prompt"


class NearDup(Strict):
    """MinHash estimated Jaccard of word shingles >= threshold against an already kept completion."""

    enabled: bool = True
    scope: Literal["prompt", "global"] = "prompt"
    threshold: float = Field(default=0.9, gt=0, le=1)
    num_perm: int = Field(default=128, ge=16, le=1024)
    shingle: int = Field(default=5, ge=1, le=32)
    seed: int = 1


class ExtraBenchmark(Strict):
    name: str
    path: str  # a JSONL file
    field: str  # the problem text field


class Decontaminate(Strict):
    """Drop every sample of a prompt whose problem shares a word n-gram with a benchmark problem."""

    enabled: bool = True
    default_benchmarks: bool = True  # GSM8K test, MATH-500, AIME 2024
    extra: list[ExtraBenchmark] = []
    ngram: int = Field(default=8, ge=1, le=32)
    min_coverage: float = Field(default=0.0, ge=0, le=1)  # see cot_distill/decontam.py


class PreferTeachers(Strict):
    """Per prompt, the first teacher of this list that has a survivor; teachers not listed are never used."""

    prefer: list[str] = Field(min_length=1)


class TeacherQuota(Strict):
    """Shares of the kept rows by teacher. Each prompt goes to one listed teacher with survivors: prompts are taken
    in a seeded hash order (select.seed; never file order), each given to the teacher furthest below its share so
    far (fewest rows per unit of share; ties by the order of `teachers:`). Teachers not listed are never used."""

    quota: dict[str, float] = Field(min_length=1)

    @field_validator("quota")
    @classmethod
    def shares_sum_to_one(cls, quota: dict[str, float]) -> dict[str, float]:
        if any(share <= 0 for share in quota.values()):
            raise ValueError(f"every share must be above 0 (leave a teacher out instead), got {quota}")
        if abs(sum(quota.values()) - 1) > 1e-6:
            raise ValueError(f"the shares must sum to 1, got {sum(quota.values()):g}")
        return quota


def _across_form(value: Any) -> str | None:
    """Which form of across_teachers a value is, so an error names that form's problem and not every form's."""
    if isinstance(value, (str, PreferTeachers, TeacherQuota)):
        return "quota" if isinstance(value, TeacherQuota) else "prefer" if isinstance(value, PreferTeachers) else "name"
    return next((form for form in ("prefer", "quota") if isinstance(value, dict) and form in value), None)


AcrossTeachers = Annotated[
    Annotated[Literal["all", "shortest_verified"], Tag("name")] | Annotated[PreferTeachers, Tag("prefer")]
    | Annotated[TeacherQuota, Tag("quota")],
    Discriminator(_across_form, custom_error_type="across_teachers",
                  custom_error_message="expected all, shortest_verified, {prefer: [names]} or {quota: {name: share}}")]


class Select(Strict):
    """Per prompt, after all filters: keep all survivors, or the k shortest (by tokens), or k seeded-random.
    across_teachers (several teachers): `all` pools every teacher's survivors; `shortest_verified` keeps only the
    teacher whose shortest survivor (verified and through every filter) is the shortest, ties by the order of
    `teachers:`; `{prefer: [...]}` and `{quota: {...}}` as above. strategy and k then apply to that teacher's
    survivors."""

    strategy: Literal["all", "shortest", "random"] = "all"
    k: int | None = Field(default=None, ge=1)  # shortest/random: default 1; all: an optional cap (lowest sample_idx)
    seed: int = 0
    across_teachers: AcrossTeachers = "all"

    def across_form(self) -> str:
        """all, shortest_verified, prefer or quota."""
        across = self.across_teachers
        return across if isinstance(across, str) else "prefer" if isinstance(across, PreferTeachers) else "quota"

    def teacher_names(self) -> list[str]:
        """The teachers across_teachers names (prefer, quota), for the recipe to check against `teachers:`."""
        across = self.across_teachers
        return [] if isinstance(across, str) else list(getattr(across, self.across_form()))


class CurateSection(Strict):
    output_dir: str = "runs/curate"
    allow_incomplete: bool = False  # curate a generate folder without manifest.json (a run still in progress)
    # drop samples of another teacher, prompt template or sampling parameters (each of `teachers:` with its own)
    only_current_samples: bool = True
    batch_size: int = Field(default=2048, ge=1)
    # Processes for the per-text work (word hashes, loop check, digests, MinHash, decontamination), a batch ahead
    # of the main process. 0: all in the main process; None: CPU count - 1 (at most 3), or 0 for inputs under 64 MB.
    workers: int | None = Field(default=None, ge=0)
    completeness: CompletenessFilter = CompletenessFilter()
    repetition: RepetitionFilter = RepetitionFilter()
    length: LengthFilter = LengthFilter()
    correctness: CorrectnessFilter = CorrectnessFilter()
    exact_dedup: ExactDedup = ExactDedup()
    near_dup: NearDup = NearDup()
    decontaminate: Decontaminate = Decontaminate()
    select: Select = Select()
    # think_tags: "<think>\n{reasoning}\n</think>\n\n{answer}" in the content; reasoning_content: the reasoning
    # in the assistant message's `reasoning_content` key (for Qwen3-style chat templates).
    reasoning_format: Literal["think_tags", "reasoning_content"] = "think_tags"
    histogram_bins: int = Field(default=40, ge=2)

    @model_validator(mode="before")
    @classmethod
    def _select_shorthand(cls, data: Any) -> Any:
        """`select: shortest` means `select: {strategy: shortest}`."""
        if isinstance(data, dict) and isinstance(data.get("select"), str):
            data = {**data, "select": {"strategy": data["select"]}}
        return data

    @model_validator(mode="after")
    def _shortest_verified_needs_grading(self) -> CurateSection:
        if self.select.across_teachers == "shortest_verified" and not self.correctness.enabled:
            raise ValueError("select.across_teachers: shortest_verified compares verified traces: it needs "
                             "curate.correctness enabled")
        return self
