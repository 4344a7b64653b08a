"""The cards `cot-distill push` writes: the dataset's (recipe, teacher identity, counts and filters, curate config)
and each student's (base model or teacher layers, method, training config, data, eval rows with their standard
errors, quantization), as the hub's README.md with its YAML header.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cot_distill.pipeline.students import AFTER, TEACHER

HUB = "https://huggingface.co"
TAGS = ["reasoning", "chain-of-thought", "distillation", "cot-distill"]
MISSING = "—"


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
