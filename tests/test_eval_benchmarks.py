"""Benchmark loaders and eval settings: offline counts and golds, hub field mapping, clear errors."""

from __future__ import annotations

import re

import pytest

from cot_distill.config import RecipeError, load_recipe
from cot_distill.config.eval import EvalError, EvalSection, LocalBenchmark, eval_settings
from cot_distill.evaluate.eval_sets import aime_gold, gsm8k_gold, load_benchmark
from cot_distill.records import RecordError


@pytest.mark.parametrize("name, count", [("gsm8k", 1319), ("math500", 500), ("aime24", 30)])
def test_offline_benchmarks_have_every_problem_with_a_gold_answer(name, count):
    benchmark = load_benchmark(name)
    assert len(benchmark.problems) == count
    assert len({problem.id for problem in benchmark.problems}) == count
    assert all(problem.problem.strip() and problem.answer and problem.answer.strip() for problem in benchmark.problems)
    if name in ("gsm8k", "aime24"):  # integer answers, without GSM8K's '####' or thousands commas
        assert all(re.fullmatch(r"-?\d+", problem.answer) for problem in benchmark.problems)


def test_offline_golds_and_breakdown_fields_are_the_known_ones():
    gsm8k = load_benchmark("gsm8k")
    assert gsm8k.problems[0].answer == "18" and gsm8k.problems[0].id == "0"  # Janet's ducks
    assert "Janet" in gsm8k.problems[0].problem
    aime = load_benchmark("aime24")
    assert aime.problems[0].answer == "204" and aime.problems[-1].answer == "902"
    math500 = load_benchmark("math500")
    assert math500.group_by == ("subject", "level")
    assert {problem.meta["subject"] for problem in math500.problems} == {
        "Algebra", "Intermediate Algebra", "Prealgebra", "Number Theory", "Precalculus", "Geometry",
        "Counting & Probability"}
    assert {problem.meta["level"] for problem in math500.problems} == {1, 2, 3, 4, 5}
    assert len(load_benchmark("math500", limit=7).problems) == 7


def test_gold_normalisation():
    assert gsm8k_gold("He pays 1,000 + 250 = 1,250.\n#### 1,250") == "1250"
    assert aime_gold("033") == "33" and aime_gold(" 204 ") == "204"
    with pytest.raises(RecordError, match="####"):
        gsm8k_gold("no marker here")


def test_hub_loading_maps_the_hub_fields(monkeypatch):
    """The hub copies are not reachable here: feed rows shaped like each dataset's schema to load_dataset."""
    import datasets

    hub_rows = {
        "openai/gsm8k": [{"question": "1+1?", "answer": "one and one\n#### 2"}],
        "HuggingFaceH4/MATH-500": [{"problem": "p", "solution": "s", "answer": "\\frac12", "subject": "Algebra",
                                    "level": 3, "unique_id": "test/algebra/1.json"}],
        "HuggingFaceH4/aime_2024": [{"id": 60, "problem": "q", "solution": "s", "answer": "033", "url": "u",
                                     "year": "2024"}],
    }
    calls = []

    def fake_load_dataset(dataset_id, config_name=None, split=None):
        calls.append((dataset_id, config_name, split))
        return hub_rows[dataset_id]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    gsm8k, math500, aime = (load_benchmark(name, source="hub") for name in ("gsm8k", "math500", "aime24"))
    assert calls == [("openai/gsm8k", "main", "test"), ("HuggingFaceH4/MATH-500", None, "test"),
                     ("HuggingFaceH4/aime_2024", None, "train")]
    assert (gsm8k.problems[0].id, gsm8k.problems[0].answer) == ("0", "2")
    assert math500.problems[0].id == "test/algebra/1.json" and math500.problems[0].meta["level"] == 3
    assert (aime.problems[0].id, aime.problems[0].answer) == ("60", "33")
    assert gsm8k.origin == "hub:openai/gsm8k/main[test]"


def test_local_benchmark_with_field_mapping(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"qid": "x1", "q": "2+2?", "a": 4, "topic": "add"}\n'
                    '{"qid": "x2", "q": "3+3?", "a": 6, "topic": "add"}\n')
    spec = LocalBenchmark(name="mine", path=str(path), problem="q", answer="a", id="qid", group_by=["topic"])
    benchmark = load_benchmark(spec)
    assert [(p.id, p.answer) for p in benchmark.problems] == [("x1", "4"), ("x2", "6")]
    assert benchmark.group_by == ("topic",)


@pytest.mark.parametrize("content, fields, message", [
    ('{"q": "a", "a": "1"}\n{"a": "2"}\n', {"problem": "q", "answer": "a"}, r"mine.jsonl:2: missing field 'q'"),
    ('{"q": "a", "a": "1"}\n', {"problem": "q", "answer": "gold"}, r"mine.jsonl:1: missing field 'gold'"),
    ('{"q": "a", "a": "1"}\n', {"problem": "q", "answer": "a", "group_by": ["topic"]},
     r"mine.jsonl: problem .*missing group_by field\(s\) \['topic'\]"),
])
def test_a_bad_local_benchmark_names_file_line_and_field(tmp_path, content, fields, message):
    path = tmp_path / "mine.jsonl"
    path.write_text(content)
    with pytest.raises(RecordError, match=message):
        load_benchmark(LocalBenchmark(name="mine", path=str(path), **fields))


def test_a_bad_benchmark_name_fails_in_the_recipe_with_its_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("teacher: {model: t}\ndata: {prompts: p.jsonl}\n"
                      "eval:\n  samples: 2\n  benchmarks: [gsm8k, gsm9k]\n")
    with pytest.raises(RecipeError, match=rf"{re.escape(str(recipe))}:5: eval.benchmarks: .*unknown benchmark 'gsm9k'"):
        load_recipe(recipe)
    with pytest.raises(RecordError, match="unknown benchmark 'gsm9k'"):
        load_benchmark("gsm9k")


def test_cli_options_override_the_section_and_errors_name_the_option():
    settings = eval_settings(EvalSection(samples=8), [], benchmarks="gsm8k,mine=data/m.jsonl", max_tokens=64,
                             samples=None)
    assert settings.samples == 8 and settings.sampling.max_tokens == 64
    assert settings.benchmarks == ["gsm8k", LocalBenchmark(name="mine", path="data/m.jsonl")]
    with pytest.raises(EvalError, match="--benchmarks: eval.benchmarks: .*unknown benchmark 'aime25'"):
        eval_settings(None, [], benchmarks="gsm8k,aime25")
    with pytest.raises(EvalError, match="--samples: eval.samples: Input should be greater than or equal to 1"):
        eval_settings(None, [], samples=0)
    with pytest.raises(EvalError, match="distinct"):
        eval_settings(None, [], benchmarks="gsm8k,gsm8k")
    assert eval_settings(None, ["eval.sampling.temperature=0.0"]).sampling.temperature == 0.0
    with pytest.raises(EvalError, match="only eval"):
        eval_settings(None, ["generate.concurrency=3"])


def test_sampling_defaults_are_r1s():
    sampling = EvalSection().sampling
    assert (sampling.temperature, sampling.top_p, sampling.max_tokens) == (0.6, 0.95, 32768)
    assert EvalSection().benchmarks == ["gsm8k", "math500", "aime24"]


def test_what_to_evaluate_comes_from_the_recipe_or_the_options(tmp_path):
    from cot_distill.evaluate import prepare_eval

    recipe = tmp_path / "r.yaml"
    recipe.write_text("teacher: {model: served-teacher, base_urls: ['http://teacher:8000/v1']}\n"
                      "data: {prompts: p.jsonl}\neval: {samples: 3}\n")
    settings, target = prepare_eval(recipe, limit=5)
    assert (settings.samples, settings.limit, target.model, target.launch) == (3, 5, "served-teacher", None)
    _, student = prepare_eval(recipe, overrides=["eval.model=runs/train/final"])  # the recipe names its student
    assert student.launch.model_path == "runs/train/final" and student.model == "final"
    _, student = prepare_eval(recipe, model="/models/other", served_name="s")
    assert (student.model, student.launch.model_path) == ("s", "/models/other")
    with pytest.raises(EvalError, match="nothing to evaluate"):
        prepare_eval()
    with pytest.raises(EvalError, match="not both"):
        prepare_eval(model="/m", endpoint="http://x/v1")
    with pytest.raises(EvalError, match="cannot list the models of http://127.0.0.1:9/v1"):
        prepare_eval(endpoint="http://127.0.0.1:9/v1")
