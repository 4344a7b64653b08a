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
read from the variable push.token_env just before uploading and is written nowhere.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cot_distill.config import Recipe, TrainSection
from cot_distill.config.push import PushSection
from cot_distill.config.quantize import quantized_dir
from cot_distill.errors import UserError
from cot_distill.pipeline.students import AFTER, TEACHER, trained_students
from cot_distill.records import (
    MANIFEST,
    invalidate_manifest,
    read_json,
    read_manifest,
    write_json_atomic,
    write_manifest,
)

HUB = "https://huggingface.co"
CARD_FILE, PLAN_FILE = "README.md", "plan.json"
DATASET_LABEL, QUANTIZED_LABEL = "dataset", "student_quantized"
# What train keeps out of its manifest (train/run.py _output_files): resumable state, not the model.
TRAINING_STATE = ("checkpoint-", "stale-checkpoints", "student_init")
# README.md: the card replaces it. training_args.bin: a pickle of TrainingArguments, which can hold a hub_token
# and which the hub flags as unsafe; nobody loading the model needs it.
NEVER_UPLOADED = {CARD_FILE, "training_args.bin", MANIFEST}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
TAGS = ["reasoning", "chain-of-thought", "distillation", "cot-distill"]
MISSING = "—"


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


@dataclass(frozen=True)
class Student:
    """What a student's card is made of: the train section and manifest that made it, its quantization."""

    label: str
    repo_id: str
    train: dict[str, Any]  # the train section as its manifest recorded it (what made these weights)
    manifest: dict[str, Any]  # train's manifest, or the quantized folder's
    adapter: bool
    quantization: dict[str, Any] | None = None  # None: not quantized
    quantized_from: str | None = None  # the repo of the unquantized student, when pushed


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


# ------------------------------------------------------------------------------------------- the dataset card

def _code_block(value: Any) -> str:
    return "```yaml\n" + yaml.safe_dump(value, sort_keys=False, allow_unicode=True).rstrip() + "\n```"


def _config_block(section: dict[str, Any]) -> str:
    """A recipe section as YAML, without its output_dir: a path on the machine that ran it means nothing on the
    hub."""
    return _code_block({key: value for key, value in section.items() if key != "output_dir"})


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _count(value: Any) -> str:
    return MISSING if value is None else f"{value:,}"


def size_category(rows: int) -> str:
    """The hub's size_categories label for `rows`."""
    for bound, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                         (10_000_000, "1M<n<10M")):
        if rows < bound:
            return label
    return "10M<n<100M"


def identity_text(identities: list[dict[str, Any]]) -> str:
    if not identities:
        return "not recorded (generate's manifest is not on this machine)"
    return "; ".join(", ".join(f"{key}=`{value}`" for key, value in sorted(identity.items())) or "none reported"
                     for identity in identities)


def dataset_card(curate_manifest: dict[str, Any], curate_report: dict[str, Any],
                 identities: list[dict[str, Any]], repo_id: str | None) -> str:
    """The dataset card's text, from what curate recorded: its manifest's recipe snapshot (the recipe that made
    the data), counts and hashes, its report.json's filters, and the teacher identity generate recorded."""
    from huggingface_hub import DatasetCardData

    from cot_distill.curate import TRAIN_FILE

    recipe = curate_manifest["recipe"]
    teacher, generate, output = recipe["teacher"], recipe["generate"], curate_report["output"]
    inputs = curate_report["input"]
    metadata = DatasetCardData(pretty_name=f"{recipe['name']}: curated chain-of-thought traces", tags=TAGS,
                               task_categories=["text-generation"], size_categories=[size_category(output["rows"])])
    filters = [[row["name"], _count(row["in"]), _count(row["out"]),
                ", ".join(f"{reason} {count:,}" for reason, count in row["dropped"].items()) or MISSING]
               for row in curate_report["filters"]]
    counts = [["teacher samples read", _count(inputs.get("lines"))], ["rows", _count(output["rows"])],
              ["prompts with a row", _count(output["prompts"])], ["prompts in the data", _count(inputs.get("prompts"))],
              ["prompts without a sample", _count(inputs.get("prompts_without_sample"))],
              ["requests the teacher rejected for good", _count(inputs.get("generate_failed_permanently"))]]
    load = f'`datasets.load_dataset("{repo_id}")`' if repo_id else "`datasets.load_from_disk` on the curate folder"
    body = f"""# {recipe['name']}: curated chain-of-thought traces

{output['rows']:,} conversations for {output['prompts']:,} prompts: traces of `{teacher['model']}`, filtered and
selected by `cot-distill curate` (recipe `{recipe['name']}`, finished {curate_manifest.get('finished_at')}). Load
with {load}.

## Teacher

- model: `{teacher['model']}` (backend `{teacher['backend']}`)
- weights: {identity_text(identities)}
- prompts: `{recipe['data']['prompts']}`, prompt template `{generate['prompt_template']}`,
  {generate['samples_per_prompt']} samples per prompt
- sampling: `{json.dumps(generate['sampling'], sort_keys=True)}`

## Format

`messages`: the rendered prompt and the teacher's reply as the assistant turn (reasoning format
`{curate_report['config']['reasoning_format']}`). Columns `reasoning`, `answer_text`, `prompt_id`, `source`,
`teacher`, `grade` (extracted answer and route), `tokens`, `sample_idx`.

## Counts

{_table(["", "count"], counts)}

Completion tokens per row: mean {output['tokens']['mean']:,}, median {output['tokens']['p50']:,}, max
{output['tokens']['max']:,}.

## Filters (in order)

{_table(["filter", "in", "out", "dropped"], filters)}

Decontaminated against: {", ".join(curate_report["decontamination"]["benchmarks"]) or "none"}.

## Curate config

{_config_block(curate_report["config"])}

## Provenance

- `{TRAIN_FILE}` sha256: `{(curate_manifest.get('files') or {}).get(TRAIN_FILE, MISSING)}`
- package versions: `{json.dumps(curate_manifest.get('versions') or {}, sort_keys=True)}`
"""
    return f"---\n{metadata.to_yaml()}\n---\n\n{body}"


# --------------------------------------------------------------------------------------------- the model card

def hub_model_id(name: str | None) -> str | None:
    """`name` when it reads as a hub model id (owner/name, not a local folder); the card's base_model must be one."""
    if not name or name.count("/") != 1 or Path(name).exists() or name.startswith((".", "/")):
        return None
    return name


def _loss(value: float | None) -> str:
    return MISSING if value is None else f"{value:.4f}"


def _percent(value: float | None, se: float | None = None) -> str:
    """0.6 -> "60.0%"; with a standard error (same scale), "60.0% ± 3.1"."""
    if value is None:
        return MISSING
    return f"{100 * value:.1f}%" + ("" if se is None else f" ± {100 * se:.1f}")


def retention_by_benchmark(report: dict[str, Any], comparison: dict[str, Any] | None,
                           label: str) -> dict[str, dict[str, Any]]:
    """benchmark -> {retention, se, method} (ratios: 1.0 = all the teacher's pass@1 kept) for `label`: compare's
    rows cover every model; report.json's retention_by_benchmark covers the main student when compare is absent."""
    if comparison is not None:
        eval_dir = (report.get(label) or {}).get("eval_dir")
        names = [name for name, folder in comparison.get("folders", {}).items()
                 if eval_dir and Path(folder) == Path(eval_dir)] or [label]
        return {row["benchmark"]: {"retention": None if row["retention_percent"] is None
                                   else row["retention_percent"] / 100,
                                   "se": None if row["retention_se_percent"] is None
                                   else row["retention_se_percent"] / 100,
                                   "method": row["retention_se_method"],
                                   "tokens": row.get("mean_completion_tokens")}
                for row in comparison["rows"] if row["model"] == names[0]}
    return dict(report.get("retention_by_benchmark") or {}) if label == AFTER else {}


def eval_rows(report: dict[str, Any], comparison: dict[str, Any] | None, label: str) -> list[dict[str, Any]]:
    """One row per benchmark of `label`'s eval: pass@1 with its standard error, best pass@k, retention with its
    standard error and method, tokens per answer, and the teacher's pass@1 beside it."""
    summary = report[label]
    teacher = (report.get(TEACHER) or {}).get("benchmarks", {})
    retention = retention_by_benchmark(report, comparison, label)
    rows = []
    for name, metrics in summary["benchmarks"].items():
        k = max(metrics["pass@k"], key=int) if metrics.get("pass@k") else None
        kept = retention.get(name, {})
        rows.append({"benchmark": name, "pass@1": metrics["pass@1"], "pass@1_stderr": metrics.get("pass@1_stderr"),
                     "k": k, "pass@k": metrics["pass@k"][k] if k else None, "problems": metrics["problems"],
                     "samples_per_problem": metrics["samples_per_problem"], "retention": kept.get("retention"),
                     "retention_se": kept.get("se"), "retention_se_method": kept.get("method"),
                     "tokens": kept.get("tokens"), "teacher_pass@1": (teacher.get(name) or {}).get("pass@1")})
    return rows


def eval_section(report: dict[str, Any] | None, comparison: dict[str, Any] | None, label: str,
                 finished_at: str | None) -> str:
    """The card's evaluation: the eval rows, the means over benchmarks and, for the main student, its retention
    ± retention_se; a sentence instead where report.json has no such model or was written before these weights."""
    if report is None or label not in report:
        return "Not evaluated: report.json (written by `cot-distill run`) has no results for this model."
    if finished_at and report.get("created_at") and finished_at > report["created_at"]:
        return (f"Not shown: report.json ({report['created_at']}) predates these weights ({finished_at}); rerun "
                f"`cot-distill run` to evaluate them.")
    summary = report[label]
    rows = [[row["benchmark"], _percent(row["pass@1"], row["pass@1_stderr"]),
             f"{_percent(row['pass@k'])} (k={row['k']})" if row["k"] else MISSING,
             _percent(row["retention"], row["retention_se"]) + (" (delta method)"
                                                                 if row["retention_se_method"] == "delta_method"
                                                                 else ""),
             MISSING if row["tokens"] is None else f"{row['tokens']:,.0f}", _percent(row["teacher_pass@1"]),
             f"{row['problems']:,} x {row['samples_per_problem']}"]
            for row in eval_rows(report, comparison, label)]
    lines = [_table(["benchmark", "pass@1", "pass@k", "retention", "tokens/answer", "teacher pass@1",
                     "problems x samples"], rows), "",
             f"Mean over benchmarks: pass@1 {_percent(summary['pass@1'])}, maj@k {_percent(summary.get('maj@k'))}, "
             f"stop rate {_percent(summary.get('stop_rate'))}, {summary.get('mean_completion_tokens', 0):,.0f} "
             f"completion tokens per answer."]
    if label == AFTER and report.get("retention") is not None:
        se = report.get("retention_se")
        method = (report.get("retention_se_method") or "").replace("_", " ")
        lines.append(f"Retention (pass@1 / the teacher's): {_percent(report['retention'], se)}"
                     + (f" ({method})" if se is not None and method else "") + ".")
    lines.append("± is one standard error: of pass@1 over problems; of retention by a paired bootstrap over the "
                 "problems both models answered, or by the delta method where marked.")
    return "\n".join(lines)


def base_model_text(train: dict[str, Any]) -> str:
    init = train.get("init_from")
    if init:
        layers = (f"layers {init['keep_layers']}" if init.get("keep_layers") is not None
                  else f"every {init['every']}th layer")
        return f"built from {layers} of `{init['model']}` (init_from), then trained"
    return f"`{train['student']}`"


def method_text(train: dict[str, Any], adapter: bool) -> str:
    method = train.get("method", "sft")
    text = ("supervised fine-tuning on the teacher's traces (sft)" if method == "sft" else
            f"distillation from the teacher's logits (kd: {json.dumps(train.get('kd'), sort_keys=True)})")
    if train.get("lora"):
        text += f"; LoRA {json.dumps(train['lora'], sort_keys=True)}" + (", merged" if not adapter else
                                                                          " (this repo holds the adapter)")
    return text


def quantization_text(student: Student) -> str:
    if student.quantization is None:
        return "Not quantized: the weights are as training saved them."
    scheme = student.quantization.get("scheme", MISSING)
    details = {key: value for key, value in student.quantization.items() if key != "scheme"}
    source = f" of [{student.quantized_from}]({HUB}/{student.quantized_from})" if student.quantized_from else ""
    return f"Scheme: `{scheme}`{source}." + (f"\n\n{_code_block(details)}" if details else "")


def data_text(curate_manifest: dict[str, Any] | None, dataset_repo: str | None, train: dict[str, Any],
              identities: list[dict[str, Any]]) -> str:
    from cot_distill.curate import TRAIN_FILE

    if curate_manifest is None:
        if train.get("dataset"):
            return f"- dataset: `{train['dataset']}` (not this recipe's curate output: no provenance recorded)"
        return "- dataset: the curate stage's output, whose manifest is not on this machine: no provenance recorded"
    counts, files = curate_manifest.get("counts") or {}, curate_manifest.get("files") or {}
    where = (f"[{dataset_repo}]({HUB}/datasets/{dataset_repo})" if dataset_repo
             else "the curate stage's output (not pushed)")
    return (f"- dataset: {where}\n"
            f"- {counts.get('rows', 0):,} rows for {counts.get('prompts', 0):,} prompts, curated from "
            f"{counts.get('samples_in', 0):,} teacher samples (curate finished {curate_manifest.get('finished_at')})\n"
            f"- `{TRAIN_FILE}` sha256: `{files.get(TRAIN_FILE, MISSING)}`\n"
            f"- teacher weights: {identity_text(identities)}")


def model_card(student: Student, *, report: dict[str, Any] | None, comparison: dict[str, Any] | None,
               curate_manifest: dict[str, Any] | None, dataset_repo: str | None,
               identities: list[dict[str, Any]]) -> str:
    """A student's card text: base model, method, training data and its provenance, the eval table from
    report.json, the quantization scheme, the training config."""
    from huggingface_hub import ModelCardData

    train, manifest = student.train, student.manifest
    recipe = manifest.get("recipe") or {}
    base = student.quantized_from or hub_model_id(train.get("student")) or hub_model_id(
        (train.get("init_from") or {}).get("model"))
    metadata = ModelCardData(base_model=base, datasets=[dataset_repo] if dataset_repo else None,
                             library_name="peft" if student.adapter else "transformers",
                             pipeline_tag="text-generation", tags=TAGS)
    counts = manifest.get("counts") or {}
    teacher = (recipe.get("teacher") or {}).get("model", MISSING)
    body = f"""# {student.repo_id}

A reasoning student distilled by `cot-distill` (recipe `{recipe.get('name', MISSING)}`) from teacher `{teacher}`.

## Model

- base: {base_model_text(train)}
- method: {method_text(train, student.adapter)}
- trained on {_count(counts.get('trained_examples'))} examples for {_count(counts.get('global_step'))} steps
- final train loss {_loss(manifest.get('train_loss'))}; finished {manifest.get('finished_at')}

## Training data

{data_text(curate_manifest, dataset_repo, train, identities)}

## Evaluation

{eval_section(report, comparison, student.label, manifest.get('finished_at'))}

## Quantization

{quantization_text(student)}

## Training config

{_config_block(train)}

Package versions: `{json.dumps(manifest.get('versions') or {}, sort_keys=True)}`
"""
    return f"---\n{metadata.to_yaml()}\n---\n\n{body}"


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
