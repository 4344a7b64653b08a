"""`cot-distill push RECIPE`: the curated dataset and the trained students to the Hugging Face Hub, each with a card.

What goes where (the push section, config/push.py):

  dataset_repo    curate.output_dir/dataset through datasets' Dataset.push_to_hub, with a card: the recipe, the
                  teacher and the identity of its weights (generate's manifest), the counts and filters (curate's
                  report.json), the curate config
  student_repo    the trained student's final model: train.output_dir (with LoRA, merged/ when train.merge, else
                  the adapter), exactly the files train's manifest lists, which never include checkpoint-*/,
                  stale-checkpoints/ or student_init/
  ablation_repos  each named ablation's student, likewise
  quantized_repo  quantized_dir (default TRAIN.OUTPUT_DIR-quantized), skipped while that folder does not exist

A student's card: its base model (or the teacher layers it was built from), method, training config, the data it
was trained on (the dataset repo when pushed, curate's hash and counts), its eval rows from report.json (pass@1 with
its standard error, retention with its retention_se, tokens per answer) and its quantization scheme.

Order: every folder is checked first (manifest.json present, every listed file on disk), so a half-written output
is never uploaded and a refusal uploads nothing; then the cards and plan.json are written under push.output_dir
(all that a dry run does); then the uploads, all through one client (hub_client), which tests replace. The token is
read from the variable push.token_env just before uploading and is written nowhere. The cards themselves are
push/cards.py.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cot_distill.config import Recipe, TrainSection
from cot_distill.config.push import PushSection
from cot_distill.config.quantize import quantized_dir
from cot_distill.errors import UserError
from cot_distill.pipeline.students import AFTER, trained_students
from cot_distill.push.cards import HUB, Student, dataset_card, model_card
from cot_distill.records import (
    MANIFEST,
    invalidate_manifest,
    read_json,
    read_manifest,
    write_json_atomic,
    write_manifest,
)

CARD_FILE, PLAN_FILE = "README.md", "plan.json"
DATASET_LABEL, QUANTIZED_LABEL = "dataset", "student_quantized"
# What train keeps out of its manifest (train/run.py _output_files): resumable state, not the model.
TRAINING_STATE = ("checkpoint-", "stale-checkpoints", "student_init")
# README.md: the card replaces it. training_args.bin: a pickle of TrainingArguments, which can hold a hub_token
# and which the hub flags as unsafe; nobody loading the model needs it.
NEVER_UPLOADED = {CARD_FILE, "training_args.bin", MANIFEST}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


class PushError(UserError, RuntimeError):
    """A push that cannot start: an unfinished stage folder, a repo the recipe cannot fill, no token."""


@dataclass(frozen=True)
class Upload:
    """One repo's worth of a push: which files of which folder, with which card."""

    label: str  # dataset, student_after, student_<ablation>, student_quantized
    repo_id: str
    repo_type: str  # "dataset" or "model"
    folder: Path
    files: list[str]  # relative to folder
    card: str

    def url(self) -> str:
        return f"{HUB}/{'datasets/' if self.repo_type == 'dataset' else ''}{self.repo_id}"


# ------------------------------------------------------------------------------------------------- inputs

def require_manifest(folder: str | Path, command: str) -> dict[str, Any]:
    """The folder's manifest.json; without it the stage did not finish and nothing may be uploaded from it."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise PushError(f"{folder} has no manifest.json: its stage has not finished (run `{command}` first); "
                        f"nothing was pushed")
    return manifest


def uploadable(name: str) -> bool:
    parts = Path(name).parts
    return (not parts[0].startswith(TRAINING_STATE) and not any(part.startswith(".") for part in parts)
            and name not in NEVER_UPLOADED)


def listed_files(folder: Path, manifest: dict[str, Any], prefix: str, command: str) -> list[str]:
    """The files to upload from `folder`: those the manifest lists under `prefix` (relative to the folder), or,
    for a manifest that lists none, what is on disk; every one must be there and some must be weights."""
    listed = [name[len(prefix):] for name in manifest.get("files") or {} if name.startswith(prefix)]
    if not prefix:  # an adapter folder: a merged/ left by an earlier run with merge is another model
        listed = [name for name in listed if not name.startswith("merged/")]
    if not listed:
        listed = [str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()]
    files = sorted(name for name in listed if uploadable(name))
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise PushError(f"{folder / missing[0]} is listed in the manifest but missing: the folder changed after its "
                        f"stage finished (rerun `{command}`); nothing was pushed")
    if not any(name.endswith(WEIGHT_SUFFIXES) for name in files):
        raise PushError(f"{folder} holds no model weights ({', '.join('*' + s for s in WEIGHT_SUFFIXES)}); nothing "
                        f"was pushed")
    return files


def student_folder(train: TrainSection) -> tuple[Path, str]:
    """(the folder holding the final model, its files' prefix in train's manifest): merged/ for LoRA with merge,
    else output_dir itself (the full model, or the adapter)."""
    if train.lora is not None and train.merge:
        return Path(train.output_dir) / "merged", "merged/"
    return Path(train.output_dir), ""


def teacher_identities(generate_dir: str | Path) -> list[dict[str, Any]]:
    """What identified the teacher's weights, from generate's manifest (each shard's); [] when generate's output
    is not on this machine (the card then says so)."""
    folder = Path(generate_dir)
    manifests = [read_manifest(part) for part in [folder, *sorted(folder.glob("shard-*-of-*"))]]
    identities = [manifest.get("teacher_identity") or {} for manifest in manifests if manifest]
    return [json.loads(text) for text in dict.fromkeys(json.dumps(ident, sort_keys=True) for ident in identities)]


def read_report(recipe: Recipe) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(report.json of `cot-distill run`, compare's comparison.json); None for what is not there."""
    path = recipe.report_path()
    if not path.is_file():
        return None, None
    report = read_json(path)
    compare_dir = report.get("compare_dir")
    comparison_path = Path(compare_dir) / "comparison.json" if compare_dir else None
    comparison = read_json(comparison_path) if comparison_path and comparison_path.is_file() else None
    return report, comparison


# ------------------------------------------------------------------------------------------------- the plan

def model_repos(cfg: PushSection, recipe: Recipe) -> dict[str, tuple[str, TrainSection]]:
    """label -> (repo, train section) for every trained student the push section names."""
    students = trained_students(recipe)
    if (cfg.student_repo or cfg.ablation_repos or cfg.quantized_repo) and recipe.train is None:
        raise PushError("push names student repos, but the recipe has no train section")
    unknown = sorted(set(cfg.ablation_repos) - set(recipe.ablations))
    if unknown:
        raise PushError(f"push.ablation_repos.{unknown[0]}: the recipe has no ablation {unknown[0]!r} (it has: "
                        f"{', '.join(recipe.ablations) or 'none'})")
    repos = {AFTER: (cfg.student_repo, students.get(AFTER))} if cfg.student_repo else {}
    repos.update({f"student_{name}": (repo, students[f"student_{name}"]) for name, repo in cfg.ablation_repos.items()})
    return repos


def trained_on_curate_output(train: dict[str, Any], curate_dir: Path) -> bool:
    """Whether the student learned from this recipe's curated data (train.dataset unset means it did)."""
    dataset = train.get("dataset")
    return dataset is None or Path(dataset).resolve().is_relative_to(curate_dir.resolve())


def plan_student(label: str, repo_id: str, train: TrainSection) -> tuple[Student, Path, list[str]]:
    folder, prefix = student_folder(train)
    manifest = require_manifest(train.output_dir, "cot-distill train")
    files = listed_files(folder, manifest, prefix, "cot-distill train")
    recorded = (manifest.get("recipe") or {}).get("train") or train.model_dump(mode="json")
    adapter = train.lora is not None and not train.merge
    return Student(label, repo_id, recorded, manifest, adapter), folder, files


def plan_quantized(cfg: PushSection, recipe: Recipe) -> tuple[Student, Path, list[str]] | None:
    """The quantized student, or None while its folder does not exist (there is no quantize stage yet). The
    folder's manifest names the scheme: its `quantization` mapping ({scheme: ..., more settings}), or `scheme`."""
    main = trained_students(recipe)[AFTER]  # with a chain, its last stage
    default = (quantized_dir(recipe.quantize, main.output_dir) if recipe.quantize is not None
               else Path(f"{main.output_dir}-quantized"))
    folder = Path(cfg.quantized_dir) if cfg.quantized_dir else default
    if not folder.is_dir():
        print(f"[push] {folder} does not exist: no quantized student to push", file=sys.stderr, flush=True)
        return None
    manifest = require_manifest(folder, "the quantize step")
    files = listed_files(folder, manifest, "", "the quantize step")
    scheme = manifest.get("quantization") or {"scheme": manifest.get("scheme", "unknown")}
    # The training facts come from train's manifest (the quantized weights are those weights, requantized).
    trained = read_manifest(main.output_dir) or manifest
    train = (trained.get("recipe") or {}).get("train") or main.model_dump(mode="json")
    student = Student(QUANTIZED_LABEL, cfg.quantized_repo, train, trained, adapter=False, quantization=scheme,
                      quantized_from=cfg.student_repo)
    return student, folder, files


def plan_push(recipe: Recipe) -> list[Upload]:
    """Every upload the push section asks for, with its card, after checking every folder: raises PushError
    before anything is written or uploaded when one is unfinished."""
    from cot_distill.curate import DATASET_DIR, REPORT_FILE  # here: importing push must not load the curate stage

    cfg = recipe.push
    if not (cfg.dataset_repo or cfg.student_repo or cfg.ablation_repos or cfg.quantized_repo):
        raise PushError("nothing to push: set push.dataset_repo, push.student_repo, push.ablation_repos or "
                        "push.quantized_repo")
    repos = [cfg.student_repo, *cfg.ablation_repos.values(), cfg.quantized_repo]
    named = [repo for repo in repos if repo]
    if len(set(named)) < len(named):
        raise PushError(f"push: two models name the same repo ({named}): each needs its own")
    curate_dir = Path(recipe.curate.output_dir)
    curate_manifest = read_manifest(curate_dir)
    report, comparison = read_report(recipe)
    identities = teacher_identities(recipe.generate.output_dir)
    uploads = []
    if cfg.dataset_repo:
        curate_manifest = require_manifest(curate_dir, "cot-distill curate")
        files = listed_files_of_dataset(curate_dir, curate_manifest)
        card = dataset_card(curate_manifest, read_json(curate_dir / REPORT_FILE), identities, cfg.dataset_repo)
        uploads.append(Upload(DATASET_LABEL, cfg.dataset_repo, "dataset", curate_dir / DATASET_DIR, files, card))
    students = [plan_student(label, repo, train) for label, (repo, train) in model_repos(cfg, recipe).items()]
    quantized = plan_quantized(cfg, recipe) if cfg.quantized_repo else None
    for student, folder, files in students + ([quantized] if quantized else []):
        ours = trained_on_curate_output(student.train, curate_dir)
        card = model_card(student, report=report, comparison=comparison,
                          curate_manifest=curate_manifest if ours else None,
                          dataset_repo=cfg.dataset_repo if ours else None, identities=identities)
        uploads.append(Upload(student.label, student.repo_id, "model", folder, files, card))
    return uploads


def listed_files_of_dataset(curate_dir: Path, curate_manifest: dict[str, Any]) -> list[str]:
    """The dataset folder's files as curate's manifest lists them, each on disk, and curate's report.json beside
    them (the card's counts)."""
    from cot_distill.curate import DATASET_DIR, REPORT_FILE

    prefix = f"{DATASET_DIR}/"
    files = sorted(name.removeprefix(prefix) for name in curate_manifest.get("files") or {} if name.startswith(prefix))
    missing = [f"{prefix}{name}" for name in files if not (curate_dir / prefix / name).is_file()]
    missing += [] if (curate_dir / REPORT_FILE).is_file() else [REPORT_FILE]
    if not files or missing:
        problem = f"{missing[0]} is missing" if missing else f"its manifest lists no {prefix} files"
        raise PushError(f"{curate_dir}: {problem}: rerun `cot-distill curate`; nothing was pushed")
    return files


def write_plan(uploads: list[Upload], cfg: PushSection) -> Path:
    """The cards and plan.json under push.output_dir: what was (or, in a dry run, would be) uploaded."""
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    invalidate_manifest(out_dir)
    plan = []
    for upload in uploads:
        card_path = out_dir / upload.label / CARD_FILE
        card_path.parent.mkdir(exist_ok=True)
        card_path.write_text(upload.card, encoding="utf-8")
        plan.append({"label": upload.label, "repo_id": upload.repo_id, "repo_type": upload.repo_type,
                     "url": upload.url(), "private": cfg.private, "revision": cfg.revision,
                     "folder": str(upload.folder), "files": upload.files,
                     "card": str(card_path.relative_to(out_dir))})
    write_json_atomic(out_dir / PLAN_FILE, {"dry_run": cfg.dry_run, "uploads": plan})
    return out_dir


# ---------------------------------------------------------------------------------------------- the uploads

def hub_client(token: str):
    """The one place a hub client is made (tests pass their own to run_push)."""
    from huggingface_hub import HfApi

    return HfApi(token=token)


def read_token(cfg: PushSection) -> str:
    token = os.environ.get(cfg.token_env)
    if not token:
        raise PushError(f"no hub token: set the environment variable {cfg.token_env} (or name another with "
                        f"push.token_env), or run with --dry-run")
    return token


def prepare_repo(client, upload: Upload, cfg: PushSection) -> None:
    client.create_repo(upload.repo_id, repo_type=upload.repo_type, private=cfg.private, exist_ok=True)
    if cfg.revision:
        client.create_branch(upload.repo_id, branch=cfg.revision, repo_type=upload.repo_type, exist_ok=True)


def upload_card(client, upload: Upload, cfg: PushSection, message: str) -> None:
    client.upload_file(path_or_fileobj=upload.card.encode("utf-8"), path_in_repo=CARD_FILE,
                       repo_id=upload.repo_id, repo_type=upload.repo_type, revision=cfg.revision,
                       commit_message=f"{message}: card")


def push_dataset(client, upload: Upload, cfg: PushSection, token: str, message: str) -> None:
    import datasets

    prepare_repo(client, upload, cfg)
    # The card goes first: push_to_hub keeps an existing README's text and adds the dataset's features and splits
    # to its YAML header, which the viewer and load_dataset read; a card uploaded after it would erase them.
    upload_card(client, upload, cfg, message)
    dataset = datasets.load_from_disk(str(upload.folder))
    dataset.push_to_hub(upload.repo_id, private=cfg.private, token=token, revision=cfg.revision,
                        commit_message=message)


def push_model(client, upload: Upload, cfg: PushSection, message: str) -> None:
    prepare_repo(client, upload, cfg)
    # allow_patterns: exactly the files the manifest lists; the ignore list is a second guard for training state.
    client.upload_folder(folder_path=str(upload.folder), repo_id=upload.repo_id, repo_type="model",
                         allow_patterns=upload.files,
                         ignore_patterns=[f"{part}*" for part in TRAINING_STATE] + sorted(NEVER_UPLOADED),
                         revision=cfg.revision, commit_message=message)
    upload_card(client, upload, cfg, message)


def run_push(recipe: Recipe, *, client=None) -> dict[str, Any]:
    """The push stage: plan (checks every folder), write the cards and plan.json, then upload unless
    push.dry_run. `client`: a hub client (default hub_client(token)). Returns plan.json's content."""
    cfg = recipe.push
    uploads = plan_push(recipe)
    token = None if cfg.dry_run else read_token(cfg)
    out_dir = write_plan(uploads, cfg)
    if token is not None:
        client = client or hub_client(token)
        message = cfg.commit_message or f"cot-distill push: {recipe.name}"
        for upload in uploads:
            print(f"[push] {upload.label} -> {upload.url()} ({len(upload.files)} files)", file=sys.stderr,
                  flush=True)
            if upload.repo_type == "dataset":
                push_dataset(client, upload, cfg, token, message)
            else:
                push_model(client, upload, cfg, message)
    write_manifest(out_dir, stage="push", recipe={"push": cfg.model_dump(mode="json")},
                   counts={"uploads": len(uploads)}, files=[PLAN_FILE, *(f"{u.label}/{CARD_FILE}" for u in uploads)],
                   extra={"dry_run": cfg.dry_run})
    return read_json(out_dir / PLAN_FILE)


def run(recipe: Recipe, *, slot: Any = None) -> Path:
    """The uniform stage entry: run_push(recipe), then push.output_dir. `slot` is unused: push serves no model."""
    run_push(recipe)
    return Path(recipe.push.output_dir)
