"""`compare` over hand-made eval folders: the table, the retention number and its standard error, the PNG,
clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from cot_distill.config.eval import EvalError
from cot_distill.evaluate.compare import (
    delta_method_retention_se,
    paired_bootstrap_retention_se,
    results_table,
    retention,
    retention_se,
    run_compare,
)
from cot_distill.records import JsonlWriter, read_json, read_manifest, write_json_atomic, write_manifest


def metrics(pass_at_1, pass_at_2, tokens, stderr=None, **extra):
    return {"problems": 10, "samples_per_problem": 2, "samples": 20, "pass_at_1": pass_at_1,
            "pass_at_1_stderr": stderr, "pass_at_k": {"1": pass_at_1, "2": pass_at_2}, "maj_at_k": pass_at_1,
            "truncation_rate": 0.1, "mean_completion_tokens": tokens, "latency_s": {"p50": 1.5, "p95": 4.0},
            "throughput_tokens_per_s": 250.0, **extra}


def graded(folder, benchmark, correct_by_problem):
    """folder/benchmark/graded.jsonl as eval writes it, one line per sample; its metrics from the same samples."""
    (folder / benchmark).mkdir(parents=True, exist_ok=True)
    with JsonlWriter(folder / benchmark / "graded.jsonl") as writer:
        for prompt_id, verdicts in correct_by_problem.items():
            for sample_idx, correct in enumerate(verdicts):
                writer.write({"prompt_id": prompt_id, "sample_idx": sample_idx, "correct": correct})
    scores = np.array([np.mean(verdicts) for verdicts in correct_by_problem.values()])
    return {**metrics(round(float(scores.mean()), 4), 1.0, 100,
                      round(float(scores.std(ddof=1) / np.sqrt(len(scores))), 4)),
            "problems": len(scores), "samples_per_problem": len(next(iter(correct_by_problem.values())))}


def eval_folder(path, name, benchmarks, parameters, memory=None):
    results = {"model": {"name": name, "parameters": parameters, "size_on_disk_bytes": 2 * parameters,
                         "peak_memory": memory or {"available": False}},
               "generation": {}, "benchmarks": benchmarks}
    write_json_atomic(path / "results.json", results)
    write_manifest(path, stage="eval", recipe={}, counts={}, files=["results.json"])
    return path


@pytest.fixture
def teacher_and_student(tmp_path):
    teacher = eval_folder(tmp_path / "teacher", "big", {"gsm8k": metrics(0.8, 0.9, 1200, 0.04),
                                                        "aime24": metrics(0.4, 0.5, 9000, 0.1)}, 7_000_000_000,
                          {"available": True, "rss_bytes": 20 * 2**30, "gpu_bytes": None})
    student = eval_folder(tmp_path / "student", "small", {"gsm8k": metrics(0.6, 0.75, 800, 0.03)}, 135_000_000)
    return teacher, student


def test_compare_reports_retention_against_the_first_folder_and_draws_a_png(tmp_path, teacher_and_student):
    teacher, student = teacher_and_student
    out = tmp_path / "report"
    report = run_compare([teacher, student], out)
    rows = {(row["benchmark"], row["model"]): row for row in report["rows"]}
    assert rows["gsm8k", "student"]["retention_percent"] == 75.0  # 0.6 / 0.8
    assert rows["gsm8k", "teacher"]["retention_percent"] == 100.0
    assert ("aime24", "student") not in rows  # the student was not evaluated on it
    markdown = (out / "report.md").read_text()
    # no graded.jsonl in these folders: the delta method, sqrt(0.03^2 + 0.75^2 * 0.04^2) / 0.8 = 0.0530
    assert "| gsm8k | student | 60.0% ± 3.0 | 60.0% | 75.0% ± 5.3† | 800 |" in markdown
    assert "| gsm8k | teacher (reference) | 80.0% ± 4.0 | 80.0% | 100.0% ± 0.0 |" in markdown
    assert "| gsm8k | teacher (reference) |" in markdown
    assert "7.00B" in markdown and "135.00M" in markdown and "20.00 GiB / —" in markdown
    png = (out / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert read_json(out / "comparison.json")["reference"] == "teacher"
    assert read_manifest(out)["counts"] == {"models": 2, "rows": 3}


def test_reference_option_changes_the_denominator(tmp_path, teacher_and_student):
    teacher, student = teacher_and_student
    report = run_compare([teacher], tmp_path / "report", reference=student)  # the reference is added in front
    rows = {(row["benchmark"], row["model"]): row for row in report["rows"]}
    assert rows["gsm8k", "teacher"]["retention_percent"] == pytest.approx(133.3)
    assert rows["aime24", "teacher"]["retention_percent"] is None  # no reference score on aime24
    assert rows["aime24", "teacher"]["retention_se_percent"] is None
    assert rows["aime24", "teacher"]["retention_se_method"] is None
    assert "| aime24 | teacher | 40.0% ± 10.0 | 40.0% | — | 9,000 |" in report["markdown"]
    assert report["reference"] == "student"


def test_same_folder_names_get_their_parent_as_label(tmp_path):
    first = eval_folder(tmp_path / "a" / "eval", "m1", {"gsm8k": metrics(0.5, 0.6, 100)}, 10)
    second = eval_folder(tmp_path / "b" / "eval", "m2", {"gsm8k": metrics(0.25, 0.3, 100)}, 10)
    report = run_compare([first, second], tmp_path / "report")
    assert [row["model"] for row in report["rows"]] == ["a/eval", "b/eval"]
    assert report["rows"][1]["retention_percent"] == 50.0


def test_unfinished_or_foreign_folders_are_refused(tmp_path, teacher_and_student):
    teacher, _ = teacher_and_student
    (teacher / "manifest.json").unlink()
    with pytest.raises(EvalError, match="no manifest.json"):
        run_compare([teacher], tmp_path / "report")
    with pytest.raises(EvalError, match="no results.json"):
        run_compare([tmp_path], tmp_path / "report")


def test_retention_is_undefined_against_a_zero_reference():
    assert retention(0.3, 0.0) is None and retention(0.3, 0.6) == 50.0 and retention(None, 0.5) is None


def test_results_table_has_a_row_per_benchmark_and_the_breakdowns():
    results = {"model": {"name": "m"}, "benchmarks": {
        "math500": metrics(0.5, 0.7, 300, 0.05, by_level={"1": {"problems": 4, "pass_at_1": 0.75}}),
        "gsm8k": metrics(0.9, 0.95, 200, throughput_tokens_per_s=None)}}
    table = results_table(results)
    assert "| math500 | 10 | 2 | 50.0% ± 5.0 | 70.0% (k=2) | 50.0% | 10.0% | 300 | 1.50 / 4.00 | 250 |" in table
    assert "| gsm8k | 10 | 2 | 90.0% ± — | 95.0% (k=2) | 90.0% | 10.0% | 200 | 1.50 / 4.00 | — |" in table
    assert "math500 by level:" in table and "| 1 | 4 | 75.0% |" in table


def test_delta_method_is_the_ratio_of_two_independent_means_error():
    # R = 0.6 / 0.8 = 0.75; relative errors 0.03 / 0.6 = 0.04 / 0.8 = 0.05; se = 0.75 * sqrt(2) * 0.05
    assert delta_method_retention_se(0.6, 0.03, 0.8, 0.04) == pytest.approx(0.75 * 2 ** 0.5 * 0.05, rel=1e-12)
    assert delta_method_retention_se(0.0, 0.0, 0.5, 0.1) == 0.0  # stays defined when the student scored 0
    assert delta_method_retention_se(0.6, None, 0.8, 0.04) is None


def test_retention_se_is_undefined_where_retention_is():
    student, zero = metrics(0.3, 0.4, 10, 0.05), metrics(0.0, 0.0, 10, 0.0)
    assert retention_se(student, zero, None, None, is_reference=False) == (None, None)
    assert retention_se(student, None, None, None, is_reference=False) == (None, None)
    assert retention_se(student, metrics(0.6, 0.7, 10, 0.05), None, None, is_reference=False)[1] == "delta_method"


def test_paired_bootstrap_of_identical_scores_has_no_spread():
    # Resampled independently, two models of pass@1 0.5 over 40 problems would give a ratio se near 0.32;
    # resampled as pairs, the same problems in both means, the ratio is 1 in every resample.
    scores = {f"p{index}": index % 2 * 1.0 for index in range(40)}
    assert paired_bootstrap_retention_se(scores, dict(scores)) == 0.0


def test_paired_bootstrap_agrees_with_the_linearised_paired_error():
    # 200 problems, one sample each: the reference solves the first 120; the student 100 of those and 10 others.
    reference = np.array([1.0] * 120 + [0.0] * 80)
    student = np.array([1.0] * 100 + [0.0] * 20 + [1.0] * 10 + [0.0] * 70)
    ids = [f"p{index:03d}" for index in range(200)]
    se = paired_bootstrap_retention_se(dict(zip(ids, student)), dict(zip(ids, reference)))
    ratio = student.mean() / reference.mean()
    # first order: R_hat - R ~ mean(s_i - R r_i) / p_r, so se ~ sd(s - R r) / (sqrt(n) p_r) = 0.0438
    linearised = np.std(student - ratio * reference, ddof=1) / np.sqrt(200) / reference.mean()
    assert se == pytest.approx(linearised, rel=0.1)
    independent = delta_method_retention_se(student.mean(), student.std(ddof=1) / np.sqrt(200),
                                            reference.mean(), reference.std(ddof=1) / np.sqrt(200))
    assert se < 0.7 * independent  # 0.044 against 0.079: pairing removes the shared difficulty of the problems
    assert paired_bootstrap_retention_se(dict(zip(ids, student)), dict(zip(ids, reference))) == se  # fixed seed


def test_compare_bootstraps_over_graded_samples_when_the_problems_match(tmp_path):
    teacher_dir, student_dir, other_dir = tmp_path / "teacher", tmp_path / "student", tmp_path / "other"
    verdicts = {f"p{index}": [index % 3 != 0, index % 2 == 0] for index in range(30)}
    eval_folder(teacher_dir, "big", {"gsm8k": graded(teacher_dir, "gsm8k", verdicts)}, 10)
    eval_folder(student_dir, "small", {"gsm8k": graded(student_dir, "gsm8k", dict(verdicts))}, 5)
    fewer = {problem: verdict for problem, verdict in verdicts.items() if problem != "p0"}  # other problems
    eval_folder(other_dir, "tiny", {"gsm8k": graded(other_dir, "gsm8k", fewer)}, 1)
    report = run_compare([teacher_dir, student_dir, other_dir], tmp_path / "report")
    rows = {row["model"]: row for row in report["rows"]}
    assert rows["student"]["retention_percent"] == 100.0
    assert (rows["student"]["retention_se_percent"], rows["student"]["retention_se_method"]) == (0.0,
                                                                                                   "paired_bootstrap")
    assert rows["other"]["retention_se_method"] == "delta_method" and rows["other"]["retention_se_percent"] > 0
    assert rows["teacher"]["retention_se_method"] == "reference"
    saved = read_json(tmp_path / "report" / "comparison.json")
    assert saved["rows"][1]["retention_se_percent"] == 0.0 and saved["bootstrap"] == {"resamples": 2000, "seed": 0}
    assert f"| gsm8k | student | {100 * rows['student']['pass_at_1']:.1f}% ± " in report["markdown"]
    assert "| 100.0% ± 0.0 |" in report["markdown"] and "†" in report["markdown"]


def test_gpu_memory_is_the_servers_own_processes_not_the_machines():
    from cot_distill.evaluate.footprint import parse_compute_apps

    nvidia_smi = "4242, 30000\n4243, 1200\n999, 70000\n"  # 999: another job on the same GPUs
    assert parse_compute_apps(nvidia_smi, {4242, 4243}) == 31200 * 2**20
    assert parse_compute_apps("No running processes found\n", {4242}) == 0
