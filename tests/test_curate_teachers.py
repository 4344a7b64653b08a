"""curate across several teachers (`teachers:`): each teacher's samples admitted against that teacher's own
settings, select.across_teachers (all, shortest_verified, prefer, quota), by_teacher and teacher_agreement in
report.json, a teacher_name column. The ledger is written by the real generate stage against stand-in teachers
(tests/stand_in.py): `right` always answers the gold answer, `wrong` always a wrong one, `careful` the gold answer
after a longer reasoning. All report the same served name and weights: only the teacher's name tells them apart."""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import pytest
import yaml

from cot_distill.assets import qwen3_tokenizer_dir
from cot_distill.config import RecipeError, load_recipe
from cot_distill.curate import CurateError, run_curate
from cot_distill.curate.report import format_table
from cot_distill.generate import run_generate

from conftest import SERVED_NAME
from stand_in import StandIn

PROMPTS = 12
SAMPLES = {"right": 3, "wrong": 2, "careful": 2}  # right sets its own samples_per_prompt; the others take generate's
QUESTION = re.compile(r"What is (\d+) \+ (\d+)\?")


def numbers(prompt: str) -> tuple[int, int]:
    first, second = map(int, QUESTION.search(prompt).groups())
    return first, second


def right(prompt: str) -> str:
    """Short reasoning on prompts with an even first number, a long one on odd."""
    a, b = numbers(prompt)
    slowly = " ".join(f"step {step} adds the digits of {a} and {b} once more." for step in range(8))  # no loop
    thinking = f"{a} plus {b}" if a % 2 == 0 else slowly
    return f"<think>{thinking}</think> The answer is \\boxed{{{a + b}}}."


def careful(prompt: str) -> str:
    a, b = numbers(prompt)
    return f"<think>{'Adding carefully, step by step. ' * 3}</think> The answer is \\boxed{{{a + b}}}."


def wrong(prompt: str) -> str:
    return "<think>no</think> \\boxed{-1}."  # the shortest of all, never right


@pytest.fixture(scope="module")
def ledger_dir(tmp_path_factory):
    """One generate run of the three teachers into one ledger (84 samples)."""
    root = tmp_path_factory.mktemp("teachers")
    (root / "prompts.jsonl").write_text("".join(
        json.dumps({"id": f"p{i:02d}", "problem": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1)}) + "\n"
        for i in range(PROMPTS)))
    stand_ins = {name: StandIn(answer=answer) for name, answer in
                 (("right", right), ("wrong", wrong), ("careful", careful))}
    try:
        run_generate(load_recipe(write_recipe(root, stand_ins, "gen-recipe")))
    finally:
        for stand_in in stand_ins.values():
            stand_in.close()
    return root, {name: stand_in.base_url for name, stand_in in stand_ins.items()}


def write_recipe(root: Path, stand_ins: dict, name: str, order=("right", "wrong", "careful"), rename=None,
                 wrong_temperature: float = 0.3, **curate) -> Path:
    urls = {key: getattr(value, "base_url", value) for key, value in stand_ins.items()}
    entries = {
        "right": {"samples_per_prompt": SAMPLES["right"]},
        "wrong": {"sampling": {"temperature": wrong_temperature, "max_tokens": 64}},  # its own sampling
        "careful": {},
    }
    teachers = [{"name": (rename or {}).get(key, key), "model": SERVED_NAME, "base_urls": [urls[key]],
                 "request_timeout_s": 30, **entries[key]} for key in order]
    recipe = {
        "name": name, "teachers": teachers,
        "data": {"prompts": str(root / "prompts.jsonl"), "fields": {"id": "id"}},
        "generate": {"output_dir": str(root / "gen"), "samples_per_prompt": 2, "concurrency": 4,
                     "sampling": {"temperature": 0.8, "max_tokens": 64}, "backoff_initial_s": 0.05},
        # every sample of a teacher has the same text: dedup off, so each survives and the counts stay exact
        "curate": {"output_dir": str(root / name), "workers": 0, "correctness": {"workers": 1},
                   "exact_dedup": {"enabled": False}, "near_dup": {"enabled": False},
                   "decontaminate": {"enabled": False}, **curate},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def curate(ledger_dir, name: str, **settings) -> tuple[dict, list[dict]]:
    root, urls = ledger_dir
    recipe = load_recipe(write_recipe(root, urls, name, **settings))
    report = run_curate(recipe)
    rows = [json.loads(line) for line in (root / name / "train.jsonl").read_text().splitlines()]
    return report, rows


def kept(rows: list[dict]) -> collections.Counter:
    return collections.Counter(row["teacher_name"] for row in rows)


TOKENIZER = {"length": {"tokenizer": str(qwen3_tokenizer_dir())}}  # the stand-ins' usage is 4 tokens each


def test_all_pools_every_teacher_and_reports_by_teacher(ledger_dir):
    report, rows = curate(ledger_dir, "pooled")
    input_tally = report["filters"][0]
    assert (input_tally["in"], input_tally["out"]) == (84, 84)  # every teacher's samples are current
    assert report["by_teacher"] == {
        "right": {"samples": 36, "verified": 36, "kept": 36, "tokens_per_kept": 4.0},
        "wrong": {"samples": 24, "verified": 0, "kept": 0, "tokens_per_kept": None},
        "careful": {"samples": 24, "verified": 24, "kept": 24, "tokens_per_kept": 4.0},
    }
    assert kept(rows) == {"right": 36, "careful": 24}
    assert all(row["teacher"] == SERVED_NAME for row in rows)
    # each teacher's majority answer, per prompt: right and careful give the gold answer, wrong -1
    assert report["teacher_agreement"] == {"prompts_compared": 12, "all_agree": 0.0, "pairwise": {
        "right|wrong": 0.0, "right|careful": 1.0, "wrong|careful": 0.0}}
    table = format_table(report)
    assert re.search(r"right\s+36\s+36\s+36\s+4\.0", table) and "answers agree on 0.0% of 12 prompts" in table

    from datasets import load_from_disk

    dataset = load_from_disk(str(ledger_dir[0] / "pooled" / "dataset"))
    assert collections.Counter(dataset["teacher_name"]) == {"right": 36, "careful": 24}


def test_prefer_takes_the_first_listed_teacher_with_a_survivor(ledger_dir):
    _, rows = curate(ledger_dir, "prefer", select={"across_teachers": {"prefer": ["wrong", "right"]}})
    assert kept(rows) == {"right": 36}  # wrong has no verified trace, careful is not listed
    report, rows = curate(ledger_dir, "prefer-ungraded", correctness={"enabled": False},
                          select={"across_teachers": {"prefer": ["wrong", "right"]}})
    assert kept(rows) == {"wrong": 24}  # ungraded, wrong's traces survive, and wrong comes first
    assert report["filters"][-1] == {"name": "select", "in": 84, "out": 24, "dropped": {"not_selected": 60}}
    assert report["teacher_agreement"]["prompts_compared"] == 0  # nothing was graded: no extracted answers


def test_shortest_verified_picks_per_prompt_the_teacher_with_the_shortest_verified_trace(ledger_dir):
    report, rows = curate(ledger_dir, "shortest", select={"across_teachers": "shortest_verified"}, **TOKENIZER)
    teacher_of = {row["prompt_id"]: row["teacher_name"] for row in rows}
    # right is short on even prompts and long on odd; careful in between; wrong is the shortest but never verified
    assert teacher_of == {f"p{i:02d}": "right" if i % 2 == 0 else "careful" for i in range(PROMPTS)}
    assert kept(rows) == {"right": 6 * 3, "careful": 6 * 2}  # then select `all` keeps that teacher's survivors
    assert report["by_teacher"]["right"]["tokens_per_kept"] < report["by_teacher"]["careful"]["tokens_per_kept"]

    # equal lengths (usage: 4 tokens each): the order of `teachers:` decides
    _, rows = curate(ledger_dir, "tie", select={"across_teachers": "shortest_verified", "strategy": "shortest"})
    assert kept(rows) == {"right": PROMPTS}
    _, rows = curate(ledger_dir, "tie-reordered", order=("careful", "right", "wrong"),
                     select={"across_teachers": "shortest_verified", "strategy": "shortest"})
    assert kept(rows) == {"careful": PROMPTS}


def test_quota_shares_the_kept_rows(ledger_dir):
    report, rows = curate(ledger_dir, "quota", select={"across_teachers": {"quota": {"right": 0.75, "careful": 0.25}},
                                                       "strategy": "shortest", "k": 1})
    assert kept(rows) == {"right": 9, "careful": 3}
    assert len({row["prompt_id"] for row in rows}) == PROMPTS  # one teacher, one row per prompt
    assert [report["by_teacher"][name]["kept"] for name in ("right", "wrong", "careful")] == [9, 0, 3]
    # a teacher with no survivors for a prompt is never given it, whatever its share
    _, rows = curate(ledger_dir, "quota-wrong", select={"across_teachers": {"quota": {"wrong": 0.5, "right": 0.5}}})
    assert kept(rows) == {"right": 36}


def test_each_teachers_samples_are_checked_against_that_teacher(ledger_dir):
    # wrong's own temperature changed in the recipe: only its samples are stale
    report, _ = curate(ledger_dir, "stale", wrong_temperature=0.5)
    assert report["filters"][0]["dropped"] == {"other_params": 24}
    assert report["by_teacher"]["wrong"]["samples"] == 0
    # a teacher renamed: its samples belong to another teacher, even with the same model
    report, _ = curate(ledger_dir, "renamed", rename={"careful": "careful2"})
    assert report["filters"][0]["dropped"] == {"other_teacher": 24}
    assert report["by_teacher"]["right"]["samples"] == 36
    # the one-teacher form reads none of the named teachers' samples
    root, urls = ledger_dir
    one = yaml.safe_load(write_recipe(root, urls, "one").read_text())
    one["teacher"] = {key: value for key, value in one.pop("teachers")[0].items() if key not in ("name",
                                                                                                  "samples_per_prompt")}
    (root / "one.yaml").write_text(yaml.safe_dump(one))
    with pytest.raises(CurateError, match="other_teacher 84"):
        run_curate(load_recipe(root / "one.yaml"))


@pytest.mark.parametrize("across, message", [
    ({"prefer": ["right", "nobody"]}, r"curate\.select\.across_teachers\.prefer: no teacher named 'nobody'"),
    ({"quota": {"right": 0.5, "nobody": 0.5}}, r"curate\.select\.across_teachers\.quota: no teacher named 'nobody'"),
    ({"quota": {"right": 0.5, "wrong": 0.4}}, r"across_teachers\.quota.*must sum to 1, got 0\.9"),
    ("longest", r"across_teachers.*Input should be 'all' or 'shortest_verified'"),
])
def test_unknown_teachers_and_bad_shares_are_recipe_errors(tmp_path, across, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(write_recipe(tmp_path, dict.fromkeys(SAMPLES, "http://127.0.0.1:1/v1"), "bad",
                                 select={"across_teachers": across}))


def test_choosing_across_teachers_needs_teachers(tmp_path):
    recipe = {"teacher": {"model": "m"}, "data": {"prompts": "p.jsonl"},
              "curate": {"select": {"across_teachers": "shortest_verified"}}}
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError, match=r"curate\.select\.across_teachers\.shortest_verified: .*`teachers:`"):
        load_recipe(tmp_path / "one.yaml")
    recipe["curate"] = {"select": {"across_teachers": "shortest_verified"}, "correctness": {"enabled": False}}
    recipe["teachers"] = [{"name": "a", "model": "m"}, {"name": "b", "model": "m"}]
    del recipe["teacher"]
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError, match="shortest_verified compares verified traces"):
        load_recipe(tmp_path / "two.yaml")
