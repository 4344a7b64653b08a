"""Reports over eval results: the table printed after `eval`, and `compare` of eval folders.

compare answers "how much of the teacher did the student keep, at what cost": accuracy and retention (student
pass@1 / reference pass@1), each with its standard error, tokens per answer, latency, throughput, memory,
parameters and size on disk, as report.md, report.png (pass@k curves; accuracy vs tokens) and comparison.json;
manifest.json last.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cot_distill.config.eval import EvalError
from cot_distill.evaluate.metrics import GRADED_FILE, problem_score, samples_by_problem
from cot_distill.records import (
    invalidate_manifest,
    iter_jsonl,
    read_json,
    read_manifest,
    utc_now,
    write_json_atomic,
    write_manifest,
)

MISSING = "—"
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
PAIRED_BOOTSTRAP = "paired_bootstrap"
DELTA_METHOD = "delta_method"
IS_REFERENCE = "reference"
DELTA_MARK = "†"  # marks a retention whose standard error came from the delta method


def _number(value: float | int | None, digits: int = 1, scale: float = 1.0, suffix: str = "") -> str:
    return MISSING if value is None else f"{value * scale:,.{digits}f}{suffix}"


def _percent(value: float | None) -> str:
    return _number(value, 1, 100, "%")


def _with_se(value: str, se: str) -> str:
    """"60.0% ± 3.1"; "—" alone when there is no value, "± —" when the value has no known standard error."""
    return MISSING if value == MISSING else f"{value} ± {se}"


def _percent_with_se(value: float | None, se: float | None) -> str:
    """A share and its standard error, both in percentage points: "60.0% ± 3.1"."""
    return _with_se(_percent(value), _number(se, 1, 100))


def _bytes(value: int | None) -> str:
    return MISSING if value is None else f"{value / 2**30:,.2f} GiB"


def _count(value: int | None) -> str:
    if value is None:
        return MISSING
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= size:
            return f"{value / size:,.2f}{unit}"
    return str(value)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def best_pass_at_k(metrics: dict[str, Any]) -> tuple[str, float]:
    k = max(metrics["pass_at_k"], key=int)
    return k, metrics["pass_at_k"][k]


def results_table(results: dict[str, Any]) -> str:
    """One eval's results: a row per benchmark, then MATH-500-style breakdowns."""
    header = ["benchmark", "problems", "K", "pass@1", "pass@K", "maj@K", "truncated", "tokens/answer",
              "latency p50 / p95 (s)", "tok/s"]
    rows = []
    for name, metrics in results["benchmarks"].items():
        k, best = best_pass_at_k(metrics)
        latency = metrics["latency_s"]
        rows.append([name, str(metrics["problems"]), str(metrics["samples_per_problem"]),
                     _percent_with_se(metrics["pass_at_1"], metrics.get("pass_at_1_stderr")),
                     f"{_percent(best)} (k={k})", _percent(metrics["maj_at_k"]),
                     _percent(metrics["truncation_rate"]), _number(metrics["mean_completion_tokens"], 0),
                     f"{_number(latency['p50'], 2)} / {_number(latency['p95'], 2)}",
                     _number(metrics.get("throughput_tokens_per_s"), 0)])
    parts = [f"model: {results['model']['name']}", "", markdown_table(header, rows)]
    for name, metrics in results["benchmarks"].items():
        for key in sorted(key for key in metrics if key.startswith("by_")):
            breakdown = [[value, str(cell["problems"]), _percent(cell["pass_at_1"])]
                         for value, cell in metrics[key].items()]
            parts += ["", f"{name} {key.replace('_', ' ')}:", "",
                      markdown_table([key[3:], "problems", "pass@1"], breakdown)]
    return "\n".join(parts)

# ------------------------------------------------------------------------------------------------- compare

def load_results(folder: Path) -> dict[str, Any]:
    if not (folder / "results.json").is_file():
        raise EvalError(f"{folder}: no results.json; is it an eval output folder?")
    if read_manifest(folder) is None:
        raise EvalError(f"{folder}: no manifest.json, so the eval did not finish; rerun it before comparing")
    return read_json(folder / "results.json")


def load_problem_scores(folder: Path, results: dict[str, Any]) -> dict[str, dict[str, float] | None]:
    """Per benchmark, each problem's pass@1 from the eval's graded.jsonl (one line per sample); None for a benchmark
    without one (a folder written before graded.jsonl existed, or by hand)."""
    scores: dict[str, dict[str, float] | None] = {}
    for benchmark, metrics in results["benchmarks"].items():
        path = folder / benchmark / GRADED_FILE
        if not path.is_file():
            scores[benchmark] = None
            continue
        grouped = samples_by_problem([row for _, row in iter_jsonl(path)], metrics["samples_per_problem"])
        scores[benchmark] = {prompt_id: problem_score(rows) for prompt_id, rows in grouped.items()}
    return scores


def labels_for(folders: list[Path]) -> list[str]:
    """Folder names, or parent/name where two folders share a name."""
    names = [folder.name for folder in folders]
    return [f"{folder.parent.name}/{folder.name}" if names.count(folder.name) > 1 else folder.name
            for folder in folders]


def retention(student: float | None, reference: float | None) -> float | None:
    """Student accuracy as a share of the reference's, in %; undefined when the reference scored 0."""
    if student is None or not reference:
        return None
    return round(100 * student / reference, 1)


# Why two methods. Both models answer the same problems, so their pass@1s are correlated (a hard problem is hard
# for both) and a ratio's error from two independent standard errors overstates it. Resampling problems with
# replacement and recomputing both pass@1s on the SAME resample keeps that pairing and assumes nothing about the
# ratio's distribution, so it is used whenever both folders have per-problem results over the same problem ids.
# Otherwise (no graded.jsonl, or other problems) only the two pass@1 standard errors are known, and the delta
# method for a ratio of two independent means is all that can be said.

def paired_bootstrap_retention_se(student: dict[str, float], reference: dict[str, float],
                                  resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> float | None:
    """Standard error of mean(student) / mean(reference) (a ratio, 1.0 = all kept) over resamples of the problems,
    both means on the same resampled problems. Per-problem pass@1s keyed by the same problem ids."""
    import numpy as np

    problem_ids = sorted(reference)
    student_scores = np.array([student[problem_id] for problem_id in problem_ids])
    reference_scores = np.array([reference[problem_id] for problem_id in problem_ids])
    picks = np.random.default_rng(seed).integers(0, len(problem_ids), size=(resamples, len(problem_ids)))
    student_means = student_scores[picks].mean(axis=1)
    reference_means = reference_scores[picks].mean(axis=1)
    # a resample in which the reference solved nothing has no ratio; it is dropped (rare unless pass@1 is near 0)
    defined = reference_means > 0
    if defined.sum() < 2:
        return None
    return float(np.std(student_means[defined] / reference_means[defined], ddof=1))


def delta_method_retention_se(student_pass: float, student_se: float | None,
                              reference_pass: float, reference_se: float | None) -> float | None:
    """First-order standard error of R = p_s / p_r for independent p_s, p_r: R * sqrt((se_s/p_s)^2 + (se_r/p_r)^2),
    written as sqrt(se_s^2 + R^2 se_r^2) / p_r, the same number that stays defined when p_s = 0."""
    if student_se is None or reference_se is None or not reference_pass:
        return None
    ratio = student_pass / reference_pass
    return (student_se ** 2 + ratio ** 2 * reference_se ** 2) ** 0.5 / reference_pass


def retention_se(student: dict[str, Any], reference: dict[str, Any] | None, student_scores: dict[str, float] | None,
                 reference_scores: dict[str, float] | None, is_reference: bool) -> tuple[float | None, str | None]:
    """(standard error of retention in %, the method that gave it) for one benchmark's metrics of two models;
    (None, None) where retention itself is undefined or nothing is known of the spread."""
    if reference is None or retention(student["pass_at_1"], reference["pass_at_1"]) is None:
        return None, None
    if is_reference:
        return 0.0, IS_REFERENCE  # the reference against itself is 100% by definition
    if student_scores is not None and reference_scores is not None and student_scores.keys() == reference_scores.keys():
        se, method = paired_bootstrap_retention_se(student_scores, reference_scores), PAIRED_BOOTSTRAP
    else:
        se = delta_method_retention_se(student["pass_at_1"], student.get("pass_at_1_stderr"),
                                       reference["pass_at_1"], reference.get("pass_at_1_stderr"))
        method = DELTA_METHOD
    return (None, None) if se is None else (round(100 * se, 1), method)


def comparison_rows(runs: dict[str, dict[str, Any]], reference: str,
                    scores: dict[str, dict[str, dict[str, float] | None]] | None = None) -> list[dict[str, Any]]:
    """One row per (benchmark, model), in benchmark order of first appearance, then folder order. `scores`: per
    label and benchmark, each problem's pass@1 (load_problem_scores); without it retention's standard error comes
    from the delta method."""
    scores = scores or {}
    benchmarks = list(dict.fromkeys(name for results in runs.values() for name in results["benchmarks"]))
    rows = []
    for benchmark in benchmarks:
        reference_metrics = runs[reference]["benchmarks"].get(benchmark)
        reference_pass = reference_metrics["pass_at_1"] if reference_metrics else None
        reference_scores = scores.get(reference, {}).get(benchmark)
        for label, results in runs.items():
            metrics = results["benchmarks"].get(benchmark)
            if metrics is None:
                continue
            model = results["model"]
            memory = model.get("peak_memory") or {}
            single = model.get("single_request") or {}
            se, method = retention_se(metrics, reference_metrics, scores.get(label, {}).get(benchmark),
                                      reference_scores, label == reference)
            rows.append({
                "benchmark": benchmark, "model": label, "is_reference": label == reference,
                "pass_at_1": metrics["pass_at_1"], "pass_at_1_stderr": metrics.get("pass_at_1_stderr"),
                "pass_at_k": metrics["pass_at_k"], "maj_at_k": metrics["maj_at_k"],
                "samples_per_problem": metrics["samples_per_problem"],
                "retention_percent": retention(metrics["pass_at_1"], reference_pass),
                "retention_se_percent": se, "retention_se_method": method,
                "mean_completion_tokens": metrics["mean_completion_tokens"],
                "latency_p50_s": metrics["latency_s"]["p50"], "latency_p95_s": metrics["latency_s"]["p95"],
                "throughput_tokens_per_s": metrics.get("throughput_tokens_per_s"),
                "single_latency_p50_s": (single.get("latency_s") or {}).get("p50"),
                "single_latency_p95_s": (single.get("latency_s") or {}).get("p95"),
                "single_tokens_per_s": single.get("tokens_per_s"),
                "peak_rss_bytes": memory.get("rss_bytes"), "peak_gpu_bytes": memory.get("gpu_bytes"),
                "parameters": model.get("parameters"), "layers": model.get("layers"),
                "size_on_disk_bytes": model.get("size_on_disk_bytes"),
                "truncation_rate": metrics.get("truncation_rate"),
            })
    return rows


def retention_between(student: Path, reference: Path) -> dict[str, dict[str, Any]]:
    """Per benchmark both folders evaluated: the student's retention of the reference's pass@1 (a ratio) with its
    standard error and the method that gave it, as compare computes them for its table."""
    runs = {"student": load_results(student), "reference": load_results(reference)}
    scores = {"student": load_problem_scores(student, runs["student"]),
              "reference": load_problem_scores(reference, runs["reference"])}
    rows = comparison_rows(runs, "reference", scores)

    def ratio(percent: float | None) -> float | None:
        return None if percent is None else round(percent / 100, 4)

    return {row["benchmark"]: {"retention": ratio(row["retention_percent"]), "se": ratio(row["retention_se_percent"]),
                               "method": row["retention_se_method"]}
            for row in rows if row["model"] == "student" and row["benchmark"] in runs["reference"]["benchmarks"]}


def comparison_markdown(rows: list[dict[str, Any]], reference: str) -> str:
    header = ["benchmark", "model", "pass@1", "maj@K", "retention", "tokens/answer", "truncated",
              "latency p50 / p95 (s)", "tok/s", "single request p50 / p95 (s)", "single tok/s",
              "peak memory (RSS / GPU)", "parameters", "layers", "size on disk"]
    table = [[row["benchmark"], row["model"] + (" (reference)" if row["is_reference"] else ""),
              _percent_with_se(row["pass_at_1"], row.get("pass_at_1_stderr")), _percent(row["maj_at_k"]),
              retention_cell(row),
              _number(row["mean_completion_tokens"], 0), _percent(row.get("truncation_rate")),
              f"{_number(row['latency_p50_s'], 2)} / {_number(row['latency_p95_s'], 2)}",
              _number(row["throughput_tokens_per_s"], 0),
              f"{_number(row.get('single_latency_p50_s'), 2)} / {_number(row.get('single_latency_p95_s'), 2)}",
              _number(row.get("single_tokens_per_s"), 0),
              f"{_bytes(row['peak_rss_bytes'])} / {_bytes(row['peak_gpu_bytes'])}",
              _count(row["parameters"]), _count(row.get("layers")), _bytes(row["size_on_disk_bytes"])]
             for row in rows]
    note = (f"Retention = pass@1 / pass@1 of the reference ({reference}). ± is one standard error, in percentage "
            f"points: of pass@1 over problems; of retention by a paired bootstrap over the problems both models "
            f"answered ({BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}), or, marked {DELTA_MARK}, by the delta "
            f"method for two independent means where per-problem results are missing or cover other problems. Latency "
            f"and tok/s: the benchmark's requests inside the eval window (they depend on answer lengths and the "
            f"window); single request: the same prompts sent one at a time, each generating exactly the same number "
            f"of tokens for every model. Peak memory: the serving process's own (weights plus the KV budget its "
            f"launch settings give it), measured only for models eval served itself ({MISSING}: a remote endpoint).")
    return "\n".join(["# Comparison", "", markdown_table(header, table), "", note])


def retention_cell(row: dict[str, Any]) -> str:
    """"75.0% ± 9.1", with the delta method's mark where it gave the standard error."""
    value = _number(row["retention_percent"], 1, 1, "%")
    cell = _with_se(value, _number(row.get("retention_se_percent"), 1))
    return cell + DELTA_MARK if row.get("retention_se_method") == DELTA_METHOD else cell


def plot_comparison(rows: list[dict[str, Any]], path: Path) -> None:
    """Left: pass@k against k per model and benchmark. Right: pass@1 against tokens per answer."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    figure, (curves, scatter) = plt.subplots(1, 2, figsize=(13, 5))
    models = list(dict.fromkeys(row["model"] for row in rows))
    benchmarks = list(dict.fromkeys(row["benchmark"] for row in rows))
    # one colour per model, one marker per benchmark: a model's curves read as one family
    colours = {model: f"C{index % 10}" for index, model in enumerate(models)}
    markers = {benchmark: "osD^vP*X"[index % 8] for index, benchmark in enumerate(benchmarks)}
    all_ks = sorted({int(k) for row in rows for k in row["pass_at_k"]})
    for row in rows:
        label = f"{row['model']} · {row['benchmark']}"
        style = {"color": colours[row["model"]], "marker": markers[row["benchmark"]]}
        ks = sorted(row["pass_at_k"], key=int)
        curves.plot([int(k) for k in ks], [100 * row["pass_at_k"][k] for k in ks], label=label, **style)
        point = (row["mean_completion_tokens"], 100 * row["pass_at_1"])
        scatter.scatter(*point, **style)
        scatter.annotate(label, point, fontsize=8, xytext=(4, 4), textcoords="offset points")
    curves.set(xlabel="k (samples)", ylabel="pass@k (%)", title="pass@k")
    curves.set_xscale("log", base=2)
    curves.set_xticks(all_ks, [str(k) for k in all_ks])
    curves.minorticks_off()
    curves.legend(fontsize=8)
    scatter.set(xlabel="mean completion tokens per answer", ylabel="pass@1 (%)", title="accuracy vs tokens")
    for axis in (curves, scatter):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_compare(result_dirs: list[str | Path], out_dir: str | Path,
                reference: str | Path | None = None) -> dict[str, Any]:
    """Compare eval folders. The reference (the teacher) is `reference` or the first folder; a reference that is
    not among result_dirs is added in front. Writes report.md, report.png, comparison.json, manifest.json."""
    folders = [Path(folder) for folder in result_dirs]
    if reference is not None and Path(reference).resolve() not in [folder.resolve() for folder in folders]:
        folders.insert(0, Path(reference))
    if not folders:
        raise EvalError("compare needs at least one eval folder")
    reference_folder = Path(reference) if reference is not None else folders[0]
    labels = labels_for(folders)
    runs = {label: load_results(folder) for label, folder in zip(labels, folders)}
    scores = {label: load_problem_scores(folder, runs[label]) for label, folder in zip(labels, folders)}
    reference_label = labels[[folder.resolve() for folder in folders].index(reference_folder.resolve())]
    rows = comparison_rows(runs, reference_label, scores)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    invalidate_manifest(out_dir)
    markdown = comparison_markdown(rows, reference_label)
    (out_dir / "report.md").write_text(markdown + "\n", encoding="utf-8")
    plot_comparison(rows, out_dir / "report.png")
    comparison = {"created_at": utc_now(), "reference": reference_label,
                  "folders": {label: str(folder) for label, folder in zip(labels, folders)},
                  "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED}, "rows": rows}
    write_json_atomic(out_dir / "comparison.json", comparison)
    write_manifest(out_dir, stage="compare", recipe={"folders": comparison["folders"], "reference": reference_label},
                   counts={"models": len(runs), "rows": len(rows)},
                   files=["report.md", "report.png", "comparison.json"])
    return {**comparison, "markdown": markdown}
