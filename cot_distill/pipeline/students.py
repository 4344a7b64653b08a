"""Which students a recipe trains, and what each learns from: the main student (with a chain, each stage in order,
the last as the main student, and the direct baseline), then each ablation; the recipe whose teacher and curated
traces each one learns from; and the folder vLLM serves for each. The labels here are report.json's and the eval
folders' names.
"""

from __future__ import annotations

from pathlib import Path

from cot_distill.config import LaunchSection, Recipe, TeacherSection, TrainSection
from cot_distill.errors import UserError

TEACHER, BEFORE, AFTER, QUANTIZED = "teacher", "student_before", "student_after", "student_quantized"
DIRECT = "student_direct"  # chain.compare_direct: the last stage trained on the teacher's own traces


class PipelineError(UserError, RuntimeError):
    """`cot-distill run` cannot go on: a stage's input is missing, or the recipe asks what no stage can do."""


def trained_students(recipe: Recipe) -> dict[str, TrainSection]:
    """label -> train section, in training order (Recipe.trained_sections): the main student (with a chain: each
    stage, the last as the main student, then the direct baseline), then each ablation."""
    labels = {"train": AFTER, "chain.compare_direct": DIRECT}
    labels.update({f"ablations.{name}": f"student_{name}" for name in recipe.ablations})
    if recipe.chain is not None:
        labels.update({f"chain.stages.{index}.train": label for index, label in enumerate(chain_labels(recipe))})
    return {labels[where]: train for where, train in recipe.trained_sections().items()}


def chain_labels(recipe: Recipe) -> list[str]:
    """Each chain stage's label: student_<name>, and the last one the main student's."""
    stages = recipe.chain.stages
    return [f"student_{stage.name}" for stage in stages[:-1]] + [AFTER]


def student_model_dir(train: TrainSection) -> Path:
    """The folder vLLM can serve: the full model, or with LoRA the merged one."""
    if train.lora is not None and not train.merge:
        raise PipelineError("train.lora without train.merge: true leaves only an adapter, which the eval stage "
                            "cannot serve; set train.merge: true")
    return train.model_dir()


def teacher_recipes(recipe: Recipe) -> dict[str, Recipe]:
    """label -> the recipe whose teacher and curated traces that student learns from: the recipe itself, or for a
    chain stage after the first, the recipe with the stage before it as its teacher (served like the recipe's
    teacher) and that teacher's generate and curate folders under CHAIN.OUTPUT_DIR/NAME/."""
    students = trained_students(recipe)
    learns_from = {label: recipe for label in students}
    if recipe.chain is None:
        return learns_from
    labels = chain_labels(recipe)
    for index in range(1, len(labels)):
        previous, folder = labels[index - 1], Path(recipe.chain.output_dir) / recipe.chain.stages[index].name
        teacher = served_like_teacher(student_model_dir(students[previous]), previous, recipe.teacher)
        learns_from[labels[index]] = recipe.model_copy(update={
            "teacher": teacher, "teachers": [],
            "generate": recipe.generate.model_copy(update={"output_dir": str(folder / "generate"), "shard": None}),
            "curate": recipe.curate.model_copy(update={"output_dir": str(folder / "curate")}),
        })
    return learns_from


def main_recipe(recipe: Recipe) -> Recipe:
    """The recipe as the main student sees it: its train section (with a chain, the last stage's) and the teacher and
    curated traces it learned from (quantize calibrates on those)."""
    if recipe.chain is None:
        return recipe
    return teacher_recipes(recipe)[AFTER].model_copy(update={"train": trained_students(recipe)[AFTER]})


def untrained_student_dir(train: TrainSection) -> Path | None:
    """The student as training starts: built from the teacher's layers (made now if train has not run yet), or
    the local `train.student` folder. None for a hub id: there is no local model to serve."""
    if train.init_from is None:
        return Path(train.student) if Path(train.student).is_dir() else None
    from cot_distill.train.student_init import ensure_student_init, student_init_dir

    return ensure_student_init(train.init_from, student_init_dir(train.output_dir))


def served_like_teacher(model_dir: Path, name: str, teacher: TeacherSection) -> TeacherSection:
    """A local model launched with the teacher's launch settings (dtype, KV cache, eager mode) when it has any."""
    launch = (teacher.launch or LaunchSection(model_path=str(model_dir))).model_copy(
        update={"model_path": str(model_dir), "port": 0})
    return TeacherSection(backend="openai", model=name, launch=launch)
