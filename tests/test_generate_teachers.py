"""Several teachers (`teachers:`) in one generate job: one ledger, each teacher's name in its keys and records,
each teacher's own settings, and a kill -9 between them that resumes with every (teacher, prompt, sample) exactly
once. The teachers are stand-ins (tests/stand_in.py), one always right and one always wrong, both reporting the same
served name and weights: only the teacher's name tells their samples apart."""

from __future__ import annotations

import collections
import contextlib
import json
import re
from pathlib import Path

import pytest
import yaml

from cot_distill.config import Recipe, RecipeError, load_recipe
from cot_distill.generate import run_generate
from cot_distill.generate.requests import request_key
from cot_distill.records import iter_jsonl, read_json, read_manifest, stable_hash

from conftest import SERVED_NAME, kill_generate_after, run_cli
from stand_in import StandIn

PROMPTS, RIGHT_SAMPLES, WRONG_SAMPLES = 12, 2, 3


def gold_of(prompt: str) -> int:
    first, second = map(int, re.search(r"What is (\d+) \+ (\d+)\?", prompt).groups())
    return first + second


@pytest.fixture
def teachers():
    right = StandIn(answer=lambda prompt: f"<think>adding</think> \\boxed{{{gold_of(prompt)}}}", delay_s=0.02)
    wrong = StandIn(answer=lambda prompt: f"<think>adding</think> \\boxed{{{gold_of(prompt) + 1}}}", delay_s=0.02)
    yield right, wrong
    right.close()
    wrong.close()


def two_teacher_recipe(tmp_path: Path, prompts: Path, right: StandIn, wrong: StandIn) -> Path:
    recipe = {
        "name": "two-teachers",
        "teachers": [
            # its own samples_per_prompt and sampling; `wrong` takes the generate section's
            {"name": "right", "model": SERVED_NAME, "base_urls": [right.base_url], "request_timeout_s": 30,
             "samples_per_prompt": RIGHT_SAMPLES, "sampling": {"temperature": 0.2, "max_tokens": 24}},
            {"name": "wrong", "model": SERVED_NAME, "base_urls": [wrong.base_url], "request_timeout_s": 30},
        ],
        "data": {"prompts": str(prompts), "fields": {"id": "id", "problem": "problem", "answer": "answer"}},
        "generate": {"output_dir": str(tmp_path / "out"), "samples_per_prompt": WRONG_SAMPLES, "concurrency": 2,
                     "sampling": {"temperature": 0.8, "max_tokens": 24}, "progress_interval_s": 1.0,
                     "backoff_initial_s": 0.05},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def ledger(out: Path) -> list[dict]:
    return [row for _, row in iter_jsonl(out / "samples.jsonl")]


def assert_each_teacher_prompt_sample_once(out: Path) -> None:
    counts = collections.Counter((row["teacher_name"], row["prompt_id"], row["sample_idx"]) for row in ledger(out))
    assert not {key: n for key, n in counts.items() if n != 1}, "a sample was written twice"
    per_teacher = collections.Counter(name for name, _, _ in counts)
    assert per_teacher == {"right": PROMPTS * RIGHT_SAMPLES, "wrong": PROMPTS * WRONG_SAMPLES}


def test_every_teacher_writes_into_one_ledger_with_its_name_and_settings(tmp_path, prompts_file, teachers):
    right, wrong = teachers
    recipe = load_recipe(two_teacher_recipe(tmp_path, prompts_file, right, wrong))
    stats = run_generate(recipe)
    out = tmp_path / "out"
    assert_each_teacher_prompt_sample_once(out)
    # each teacher was asked on its own endpoint, for its own number of samples, with its own sampling
    assert len(right.arrivals) == PROMPTS * RIGHT_SAMPLES and len(wrong.arrivals) == PROMPTS * WRONG_SAMPLES
    by_name = collections.defaultdict(list)
    for row in ledger(out):
        by_name[row["teacher_name"]].append(row)
    assert {row["params"]["temperature"] for row in by_name["right"]} == {0.2}
    assert {row["params"]["temperature"] for row in by_name["wrong"]} == {0.8}
    assert all("\\boxed" in row["content"] for row in by_name["right"])
    # same served name and weights: the name alone keeps the keys apart
    assert not {row["request_key"] for row in by_name["right"]} & {row["request_key"] for row in by_name["wrong"]}
    manifest = read_manifest(out)
    assert manifest["counts"]["teachers"] == {"right": PROMPTS * RIGHT_SAMPLES, "wrong": PROMPTS * WRONG_SAMPLES}
    assert set(manifest["teacher_identity"]) == {"right", "wrong"}
    assert stats["teachers"]["wrong"]["samples_done"] == PROMPTS * WRONG_SAMPLES
    assert read_json(out / "stats.json")["samples_done"] == PROMPTS * (RIGHT_SAMPLES + WRONG_SAMPLES)

    again = run_generate(recipe)  # nothing left to send for either teacher
    assert again["samples_this_run"] == 0 and len(right.arrivals) + len(wrong.arrivals) == PROMPTS * 5


def test_kill_minus_9_between_teachers_resumes_each_exactly_once(tmp_path, prompts_file, teachers):
    right, wrong = teachers
    recipe = two_teacher_recipe(tmp_path, prompts_file, right, wrong)
    out = tmp_path / "out"
    # `right` writes 24 samples first: 30 lines is inside `wrong`'s part of the job
    at_kill = kill_generate_after(recipe, out / "samples.jsonl", PROMPTS * RIGHT_SAMPLES + 6)
    assert read_manifest(out) is None and at_kill < PROMPTS * (RIGHT_SAMPLES + WRONG_SAMPLES)
    sent_before = len(right.arrivals) + len(wrong.arrivals)

    result = run_cli("generate", str(recipe))
    assert result.returncode == 0, result.stderr[-2000:]
    assert_each_teacher_prompt_sample_once(out)
    # each teacher's resume point counts its own samples only, not the other's
    assert f"the ledger holds {PROMPTS * RIGHT_SAMPLES} samples of teacher right," in result.stderr
    assert f"the ledger holds {at_kill - PROMPTS * RIGHT_SAMPLES} samples of teacher wrong," in result.stderr
    # the resume sent only what was missing: at most the 2 requests in flight at the kill are asked twice
    resent = len(right.arrivals) + len(wrong.arrivals) - PROMPTS * (RIGHT_SAMPLES + WRONG_SAMPLES)
    assert 0 <= resent <= 2, (sent_before, at_kill, resent)
    assert read_manifest(out)["complete"]


def test_a_named_teachers_key_is_the_unnamed_key_hashed_with_its_name():
    recipe = Recipe.model_validate({"data": {"prompts": "p.jsonl"},
                                    "teachers": [{"name": "a", "model": "m"}, {"name": "b", "model": "m"}]})
    messages, params = [{"role": "user", "content": "1 + 1?"}], {"temperature": 0.6}
    unnamed = request_key(messages, recipe.teacher.model_copy(update={"name": None}), params, "t", 0)
    for teacher, _ in recipe.teacher_jobs():
        assert request_key(messages, teacher, params, "t", 0) == stable_hash({"request": unnamed,
                                                                              "teacher_name": teacher.name})


def test_teachers_need_distinct_names_and_exclude_the_one_teacher_form(tmp_path):
    def load(doc: dict):
        path = tmp_path / "r.yaml"
        path.write_text(json.dumps({"data": {"prompts": "p.jsonl"}, **doc}))
        return load_recipe(path)

    with pytest.raises(RecipeError, match="a name of its own"):
        load({"teachers": [{"name": "a", "model": "m"}, {"name": "a", "model": "n"}]})
    with pytest.raises(RecipeError, match="not both"):
        load({"teacher": {"model": "z"}, "teachers": [{"name": "a", "model": "m"}]})
    with pytest.raises(RecipeError, match="teachers.0.name"):
        load({"teachers": [{"model": "m"}]})
    recipe = load({"teachers": [{"name": "a", "model": "m", "until_verified": {"k": 1, "max_samples": 6}},
                                {"name": "b", "model": "n"}]})
    (first, first_gen), (second, second_gen) = recipe.teacher_jobs()
    assert recipe.teacher == first and first.name == "a"
    assert first_gen.samples_per_prompt == 6 and first_gen.until_verified.k == 1
    assert second_gen.samples_per_prompt == 4 and second_gen.until_verified is None


def test_the_teacher_eval_is_of_the_model_not_the_named_entry(monkeypatch):
    """With `teachers:`, run evaluates the first teacher without its entry name, so its eval requests have the keys
    of the same teacher in a one-teacher recipe (a finished eval of it is reused)."""
    from cot_distill import pipeline

    asked = {}
    monkeypatch.setattr(pipeline, "eval_one", lambda recipe, label, target, slot, weights: asked.update(
        label=label, target=target))
    named = Recipe.model_validate({"data": {"prompts": "p.jsonl"},
                                   "teachers": [{"name": "a", "model": "m", "base_urls": ["http://h:1/v1"]},
                                                {"name": "b", "model": "n", "base_urls": ["http://h:2/v1"]}]})
    single = Recipe.model_validate({"data": {"prompts": "p.jsonl"},
                                    "teacher": {"model": "m", "base_urls": ["http://h:1/v1"]}})
    pipeline.eval_teacher(named, slot=None)
    assert asked["label"] == "teacher" and asked["target"] == single.teacher


def test_each_launched_teacher_logs_its_server_to_its_own_file(monkeypatch, tmp_path):
    from cot_distill.teachers import serve

    logs = []
    monkeypatch.setattr(serve, "running_server", lambda launch, name, log_path, slot, seed: contextlib.nullcontext(
        logs.append(Path(log_path).name) or type("Server", (), {"base_urls": ["http://h:1/v1"]})()))
    recipe = Recipe.model_validate({"data": {"prompts": "p.jsonl"}, "teachers": [
        {"name": name, "model": name, "launch": {"model_path": f"/models/{name}"}} for name in ("big", "small")]})
    for teacher, gen in recipe.teacher_jobs():
        with serve.maybe_launch(teacher, gen.sampling, tmp_path):
            pass
    assert logs == ["vllm-server-big.log", "vllm-server-small.log"]
