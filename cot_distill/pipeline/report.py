"""report.json: each evaluated model's summary, the main student's retention with its uncertainty, the quantized
student against the float one, the chain, and what each stage of this invocation took (StageClock).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from cot_distill.config import Recipe, TrainSection
from cot_distill.pipeline.students import AFTER, BEFORE, DIRECT, QUANTIZED, TEACHER, chain_labels, trained_students
from cot_distill.records import read_json, utc_now, write_json_atomic


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
