"""`compare` over hand-made eval folders: the table, the retention number, the PNG, clear errors."""

from __future__ import annotations

import pytest

from cot_distill.config.eval import EvalError
from cot_distill.evaluate.compare import results_table, retention, run_compare
from cot_distill.records import read_json, read_manifest, write_json_atomic, write_manifest


def metrics(pass_at_1, pass_at_2, tokens, **extra):
    return {"problems": 10, "samples_per_problem": 2, "samples": 20, "pass_at_1": pass_at_1,
            "pass_at_k": {"1": pass_at_1, "2": pass_at_2}, "maj_at_k": pass_at_1, "truncation_rate": 0.1,
            "mean_completion_tokens": tokens, "latency_s": {"p50": 1.5, "p95": 4.0},
            "throughput_tokens_per_s": 250.0, **extra}


def eval_folder(path, name, benchmarks, parameters, memory=None):
    results = {"model": {"name": name, "parameters": parameters, "size_on_disk_bytes": 2 * parameters,
                         "peak_memory": memory or {"available": False}},
               "generation": {}, "benchmarks": benchmarks}
    write_json_atomic(path / "results.json", results)
    write_manifest(path, stage="eval", recipe={}, counts={}, files=["results.json"])
    return path


@pytest.fixture
def teacher_and_student(tmp_path):
    teacher = eval_folder(tmp_path / "teacher", "big", {"gsm8k": metrics(0.8, 0.9, 1200),
                                                        "aime24": metrics(0.4, 0.5, 9000)}, 7_000_000_000,
                          {"available": True, "rss_bytes": 20 * 2**30, "gpu_bytes": None})
    student = eval_folder(tmp_path / "student", "small", {"gsm8k": metrics(0.6, 0.75, 800)}, 135_000_000)
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
    assert "| gsm8k | student | 60.0% | 60.0% | 75.0% | 800 |" in markdown
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
        "math500": metrics(0.5, 0.7, 300, by_level={"1": {"problems": 4, "pass_at_1": 0.75}}),
        "gsm8k": metrics(0.9, 0.95, 200, throughput_tokens_per_s=None)}}
    table = results_table(results)
    assert "| math500 | 10 | 2 | 50.0% | 70.0% (k=2) | 50.0% | 10.0% | 300 | 1.50 / 4.00 | 250 |" in table
    assert "| gsm8k | 10 | 2 | 90.0% | 95.0% (k=2) | 90.0% | 10.0% | 200 | 1.50 / 4.00 | — |" in table
    assert "math500 by level:" in table and "| 1 | 4 | 75.0% |" in table
