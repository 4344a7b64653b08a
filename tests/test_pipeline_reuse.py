"""`cot-distill run` reuses a finished stage only when its inputs are the same: for training, the settings, the
curated rows, and an external dataset's or a local student's content, not only their paths.

The train stage itself is replaced by a recorder here: what is under test is the pipeline's decision to rerun it,
and real training (tests/test_train_run.py) would only make that slower to observe.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from cot_distill import train as train_stage
from cot_distill.config import load_recipe
from cot_distill.pipeline import run_train_stage
from cot_distill.records import write_manifest


def recipe_with_external_data(tmp_path: Path) -> Path:
    (tmp_path / "rows.jsonl").write_text('{"messages": [{"role": "user", "content": "1+1?"}]}\n')
    student = tmp_path / "student"
    student.mkdir()
    (student / "config.json").write_text('{"model_type": "qwen2"}')
    (student / "model.safetensors").write_bytes(b"weights v1")
    recipe = {"name": "reuse", "teacher": {"model": "t"}, "data": {"prompts": str(tmp_path / "p.jsonl")},
              "train": {"output_dir": str(tmp_path / "train"), "dataset": str(tmp_path / "rows.jsonl"),
                        "student": str(student)}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_new_content_behind_the_same_paths_retrains(tmp_path, monkeypatch):
    runs = []

    def recorded_run(train, snapshot):
        runs.append(train.dataset)
        write_manifest(train.output_dir, stage="train", recipe={}, counts={}, files=[])
        return Path(train.output_dir)

    monkeypatch.setattr(train_stage, "run_train", recorded_run)
    recipe_path = recipe_with_external_data(tmp_path)
    assert run_train_stage(load_recipe(recipe_path)) is True
    assert run_train_stage(load_recipe(recipe_path)) is False  # same inputs: reused
    with open(tmp_path / "rows.jsonl", "a") as handle:
        handle.write('{"messages": [{"role": "user", "content": "2+2?"}]}\n')
    assert run_train_stage(load_recipe(recipe_path)) is True  # more rows, same path
    (tmp_path / "student" / "model.safetensors").write_bytes(b"weights v2")
    assert run_train_stage(load_recipe(recipe_path)) is True  # other weights, same path
    assert run_train_stage(load_recipe(recipe_path)) is False
    assert len(runs) == 3
