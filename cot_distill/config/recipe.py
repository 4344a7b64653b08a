"""The recipe: one typed YAML document that drives every stage.

Unknown keys and wrong types are errors that name the YAML path and line of the offending key, e.g.
`recipes/x.yaml:12: generate.concurrency: Input should be a valid integer`. CLI overrides use the same paths:
`--set generate.concurrency=64` (the value is parsed as YAML, so `--set generate.sampling.stop=[a,b]` works).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError, model_validator

from cot_distill.config.base import RecipeError, Strict, apply_override, format_errors, key_lines
from cot_distill.config.curate import CurateSection
from cot_distill.config.eval import EvalSection
from cot_distill.config.generate import (
    TEACHER_GENERATE_KEYS,
    VLLM_DEFAULT_MAX_LOGPROBS,
    DataSection,
    GenerateSection,
    LaunchSection,
    TeacherEntry,
    TeacherSection,
)
from cot_distill.config.push import PushSection
from cot_distill.config.quantize import QuantizeSection
from cot_distill.config.train import ChainSection, TrainSection


def too_many_logprobs(key: str, wanted: int, where: str, launch: LaunchSection) -> str:
    return (f"{key}: {wanted} log-probabilities per token, and the server {where}.launch starts returns at most "
            f"{launch.max_logprobs()} (vLLM's --max-logprobs): add \"--max-logprobs\", \"{wanted}\" to "
            f"{where}.launch.extra_args")


class Recipe(Strict):
    name: str = "cot-distill"
    # One teacher, or several (`teachers:`, each with a name): generate samples every prompt from each of them into
    # one ledger, and curate chooses across them (curate.select.across_teachers). With `teachers:`, `teacher` is
    # filled in as the first of them: the one eval and the logit methods use unless told otherwise.
    teacher: TeacherSection
    teachers: list[TeacherEntry] = []
    data: DataSection
    generate: GenerateSection = GenerateSection()
    curate: CurateSection = CurateSection()
    train: TrainSection | None = None  # absent: the recipe has no train stage
    # More students trained on the same curated data, each the `train` section with these keys replaced, e.g.
    # {kd: {method: kd, output_dir: runs/demo/train-kd}}; `cot-distill run` trains, evaluates and compares them
    # next to the main student (as student_<name>).
    ablations: dict[str, dict[str, Any]] = {}
    # A teacher-assistant chain (config/train.py ChainSection): students trained in turn, each the next one's
    # teacher; the last is the main student. Absent: the main student learns from the teacher directly.
    chain: ChainSection | None = None
    quantize: QuantizeSection | None = None  # absent: the recipe has no quantize stage
    eval: EvalSection = EvalSection()
    report: str | None = None  # where `cot-distill run` writes report.json; None: next to eval.output_dir
    push: PushSection = PushSection()

    @model_validator(mode="before")
    @classmethod
    def _first_of_teachers(cls, data: Any) -> Any:
        """`teachers: [...]` without `teacher:`: the first entry is also `teacher` (a dumped recipe holds both)."""
        if not isinstance(data, dict) or not data.get("teachers"):
            return data
        entries = data["teachers"]
        if not isinstance(entries, list) or not isinstance(entries[0], (dict, TeacherEntry)):
            return data  # the field's own validation says what is wrong
        first = entries[0].model_dump() if isinstance(entries[0], TeacherEntry) else entries[0]
        derived = {key: value for key, value in first.items() if key not in TEACHER_GENERATE_KEYS}
        given = data.get("teacher")
        if given is not None and TeacherSection.model_validate(given) != TeacherSection.model_validate(derived):
            raise ValueError("set `teacher:` (one teacher) or `teachers:` (several, each with a name), not both")
        return {**data, "teacher": derived}

    @model_validator(mode="after")
    def _backend_needs(self) -> "Recipe":
        for index, teacher in enumerate(self.teachers or [self.teacher]):
            where = f"teachers.{index}" if self.teachers else "teacher"
            if teacher.backend == "openai" and not teacher.base_urls:
                raise ValueError(f"{where}.base_urls must list at least one endpoint for the openai backend")
        names = [teacher.name for teacher in self.teachers]
        if len(set(names)) != len(names):
            raise ValueError(f"teachers: each needs a name of its own (got {names})")
        return self

    @model_validator(mode="after")
    def _curate_knows_the_teachers(self) -> "Recipe":
        """curate.select.across_teachers chooses among `teachers:` by name: a typo would silently drop a teacher."""
        form = self.curate.select.across_form()
        if form == "all":
            return self
        where = f"curate.select.across_teachers.{form}"
        if not self.teachers:
            raise ValueError(f"{where}: choosing across teachers needs several, listed under `teachers:`")
        names = [teacher.name for teacher in self.teachers]
        unknown = [name for name in self.curate.select.teacher_names() if name not in names]
        if unknown:
            raise ValueError(f"{where}: no teacher named {', '.join(map(repr, unknown))} (teachers: {names})")
        return self

    def teacher_jobs(self) -> list[tuple[TeacherSection, GenerateSection]]:
        """What generate runs, in order: each teacher with its generate settings (its own where it sets them)."""
        if not self.teachers:
            return [(self.teacher, self.generate)]
        return [(entry.section(), entry.generate_section(self.generate)) for entry in self.teachers]

    @model_validator(mode="after")
    def _ablations_are_trainable(self) -> "Recipe":
        if (self.ablations or self.chain) and self.train is None:
            raise ValueError("ablations and chain vary the train section: add one")
        for name in self.ablations:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
                raise ValueError(f"ablations.{name}: use letters, digits, '_' and '-' (it names an eval folder)")
        output_dirs: list[str] = []
        for where, train in self.trained_sections().items():
            if train.output_dir in output_dirs:
                raise ValueError(f"{where}.output_dir: set one of its own (it would overwrite {train.output_dir})")
            output_dirs.append(train.output_dir)
        return self

    @model_validator(mode="after")
    def _launched_servers_return_enough_logprobs(self) -> "Recipe":
        """A vLLM server returns at most --max-logprobs (20 unless set) per position: a launched server asked for
        more would fail every request with a 400, and only once it had started."""
        for index, (teacher, generate) in enumerate(self.teacher_jobs()):
            if generate.logprobs and teacher.launch and generate.logprobs > teacher.launch.max_logprobs():
                where = f"teachers.{index}" if self.teachers else "teacher"
                raise ValueError(too_many_logprobs("generate.logprobs", generate.logprobs, where, teacher.launch))
        # An on_policy student's served teacher, unless it names a base_url, is the recipe's teacher, launched with
        # teacher.launch when it has one; for a chain stage after the first it is the stage before it, launched
        # always: with teacher.launch's settings, or vLLM's defaults (pipeline.students.served_like_teacher).
        launch = self.teacher.launch
        for where, train in self.trained_sections().items():
            served = train.on_policy.served if train.method == "on_policy" else None
            if served is None or served.base_url is not None:
                continue
            key = f"{where}.on_policy.served.top_k"
            if launch is not None and served.top_k > launch.max_logprobs():
                raise ValueError(too_many_logprobs(key, served.top_k, "teacher", launch))
            later_stage = re.fullmatch(r"chain\.stages\.[1-9]\d*\.train", where)
            if launch is None and later_stage and served.top_k > VLLM_DEFAULT_MAX_LOGPROBS:
                raise ValueError(f"{key}: {served.top_k} log-probabilities per token, and the stage before it is "
                                 f"served by a vLLM that returns at most {VLLM_DEFAULT_MAX_LOGPROBS} (its default "
                                 f"--max-logprobs; the teacher has no launch settings to raise it): lower top_k to "
                                 f"{VLLM_DEFAULT_MAX_LOGPROBS}")
        return self

    def trained_sections(self) -> dict[str, TrainSection]:
        """Where in the recipe -> each train section a run trains, in training order: `train` (with a chain, each
        stage's instead, then chain.compare_direct's), then each ablation's. Building one raises with the offending
        key."""
        if self.train is None:
            return {}
        if self.chain is None:
            sections = {"train": self.train}
        else:
            sections = {f"chain.stages.{index}.train": self.chain_train(index)
                        for index in range(len(self.chain.stages))}
            if self.chain.compare_direct:
                sections["chain.compare_direct"] = self.direct_train()
        sections.update({f"ablations.{name}": self.ablation_train(name) for name in self.ablations})
        return sections

    def ablation_train(self, name: str) -> TrainSection:
        """The train section of ablation `name`: the main one with the ablation's keys replaced."""
        return validated_train({**self.train.model_dump(exclude_unset=True), **self.ablations[name]},
                               f"ablations.{name}")

    def chain_train(self, index: int) -> TrainSection:
        """Chain stage `index`'s train section: the main one with the stage's keys replaced, in its own folder. A
        later stage's kd teacher is the stage before it (its trained student) unless the stage names one."""
        stage = self.chain.stages[index]
        merged = {**self.train.model_dump(exclude_unset=True),
                  "output_dir": str(Path(self.chain.output_dir) / stage.name / "train"), **stage.train}
        own_kd = stage.train.get("kd") or {}
        if index > 0 and merged.get("method") == "kd" and "teacher" not in own_kd:
            merged["kd"] = {**(merged.get("kd") or {}), **own_kd,
                            "teacher": str(self.chain_train(index - 1).model_dir())}
        return validated_train(merged, f"chain.stages.{index}.train")

    def direct_train(self) -> TrainSection:
        """chain.compare_direct's student: the last stage's settings, trained on the recipe teacher's traces."""
        last = self.chain.stages[-1]
        merged = {**self.train.model_dump(exclude_unset=True),
                  "output_dir": str(Path(self.chain.output_dir) / "direct" / "train"), **last.train}
        return validated_train(merged, "chain.compare_direct")

    def report_path(self) -> Path:
        return Path(self.report) if self.report else Path(self.eval.output_dir).parent / "report.json"


def validated_train(merged: dict[str, Any], where: str) -> TrainSection:
    """A train section built from merged keys; an error names `where` and the offending key."""
    try:
        return TrainSection.model_validate(merged)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        raise ValueError(f"{where}.{key}: {first['msg']}") from None


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
        lines = key_lines(node) if node is not None else {}
        raise RecipeError(format_errors(exc, str(path), lines, overridden)) from None


def recipe_snapshot(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe as stored in manifests: plain JSON, secrets never included (only env var names)."""
    return recipe.model_dump(mode="json")
