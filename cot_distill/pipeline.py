"""`cot-distill run RECIPE`: every configured stage in order, from one recipe.

generate -> curate -> train -> eval (teacher and student) -> compare. A stage whose output folder already has
a manifest made from the same inputs is reused, so a rerun after a crash or a finished run takes seconds for
the finished stages (generate and eval are also resumable inside a stage through their ledgers).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable

from cot_distill.recipe import Recipe, load_recipe, recipe_snapshot
from cot_distill.records import read_manifest, stable_hash

STAGES = ("generate", "curate", "train", "eval")
FINGERPRINT_FILE = ".pipeline-fingerprint"


class PipelineError(RuntimeError):
    pass


def log(message: str) -> None:
    print(f"[run] {message}", file=sys.stderr, flush=True)


def output_hash(folder: str | Path, name: str) -> str:
    """The sha256 a stage's manifest recorded for one output file: what the next stage's inputs are.
    (Not the whole manifest: stats and reports carry timings that change on every run.)"""
    manifest = read_manifest(folder)
    if manifest is None:
        raise PipelineError(f"{folder} has no manifest.json: the stage that writes it did not finish")
    return manifest.get("files", {}).get(name, "")


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


def student_model_dir(recipe: Recipe) -> Path:
    """The folder vLLM can serve: the full model, or with LoRA the merged one."""
    train = recipe.train
    if train.lora is not None and not train.merge:
        raise PipelineError("train.lora without train.merge: true leaves only an adapter, which the eval stage "
                            "cannot serve; set train.merge: true")
    return Path(train.output_dir) / ("merged" if train.lora is not None else "")


def run_generate_stage(recipe: Recipe) -> None:
    from cot_distill.generate import run_generate

    run_generate(recipe)  # resumable by itself: starts no server when every sample exists


def run_curate_stage(recipe: Recipe) -> None:
    from cot_distill.curate import run_curate

    fingerprint = stable_hash([recipe.curate.model_dump(mode="json"), recipe.data.model_dump(mode="json"),
                               recipe.generate.prompt_template, output_hash(recipe.generate.output_dir, "samples.jsonl")])
    reuse_or_run("curate", recipe.curate.output_dir, fingerprint, lambda: run_curate(recipe))


def run_train_stage(recipe: Recipe) -> None:
    from cot_distill.curate import DATASET_DIR, TRAIN_FILE
    from cot_distill.train import run_train

    train = recipe.train
    if train.dataset is None:
        train = train.model_copy(update={"dataset": str(Path(recipe.curate.output_dir) / DATASET_DIR)})
        recipe = recipe.model_copy(update={"train": train})
    from_curate = Path(train.dataset).resolve().is_relative_to(Path(recipe.curate.output_dir).resolve())
    inputs = output_hash(recipe.curate.output_dir, TRAIN_FILE) if from_curate else train.dataset
    fingerprint = stable_hash([train.model_dump(mode="json"), inputs])
    reuse_or_run("train", train.output_dir, fingerprint, lambda: run_train(train, recipe_snapshot(recipe)))


def run_eval_stage(recipe: Recipe) -> dict[str, Path]:
    """Evaluate the teacher and (when the recipe trains one) the student, then compare them."""
    from cot_distill.compare import run_compare
    from cot_distill.evaluate import run_eval, target_from_model

    out_root = Path(recipe.eval.output_dir)
    targets = {"teacher": recipe.teacher}
    if recipe.train is not None:
        targets["student"] = target_from_model(str(student_model_dir(recipe)), "student")
    folders = {}
    for name, target in targets.items():
        settings = recipe.eval.model_copy(update={"output_dir": str(out_root / name)})
        log(f"eval: {name}")
        run_eval(settings, target)  # resumable: regrades only when every sample exists
        folders[name] = out_root / name
    if len(folders) > 1:
        report = run_compare(list(folders.values()), out_root / "compare", folders["teacher"])
        print(report["markdown"])
    return folders


def run_pipeline(recipe_path: str | Path, overrides: list[str] | None = None,
                 stages: list[str] | None = None) -> None:
    recipe = load_recipe(recipe_path, overrides or [])
    chosen = stages or [stage for stage in STAGES if stage != "train" or recipe.train is not None]
    unknown = sorted(set(chosen) - set(STAGES))
    if unknown:
        raise PipelineError(f"unknown stage(s) {unknown}: choose from {', '.join(STAGES)}")
    if "train" in chosen and recipe.train is None:
        raise PipelineError("the recipe has no train section")
    runners = {"generate": run_generate_stage, "curate": run_curate_stage, "train": run_train_stage,
               "eval": run_eval_stage}
    started = time.monotonic()
    for stage in STAGES:
        if stage in chosen:
            runners[stage](recipe)
    log(f"all stages done in {time.monotonic() - started:.0f} s")
