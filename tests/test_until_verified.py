"""generate.until_verified and generate.budget against stand-in teachers (stand_in.py) that are always right,
always wrong, or right by a fixed rule: a real model cannot be made right or wrong on cue. Grading is the real
curate grader; the window, ledger and manifest are the real ones.
"""

from __future__ import annotations

import collections
import hashlib
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from cot_distill.config import load_recipe
from cot_distill.generate import GenerateError, run_generate
from cot_distill.grading import grade
from cot_distill.records import iter_jsonl, read_json, read_manifest

from conftest import REPO_ROOT, run_cli, write_recipe
from stand_in import StandIn

QUESTION = re.compile(r"What is (\d+) \+ (\d+)\?")  # the problems of conftest's prompts_file


def right(prompt: str) -> str:
    a, b = map(int, QUESTION.search(prompt).groups())
    return f"<think>{a} plus {b}</think> The answer is \\boxed{{{a + b}}}."


def wrong(prompt: str) -> str:
    return "<think>no idea</think> The answer is \\boxed{-1}."


def right_one_time_in_three(prompt: str) -> str:
    """Deterministic per arrival order is impossible across processes; per (prompt, wall-clock tick) is enough to
    mix verdicts within one prompt."""
    tick = hashlib.sha256(f"{prompt}{time.monotonic_ns()}".encode()).digest()[0]
    return right(prompt) if tick % 3 == 0 else wrong(prompt)


def per_prompt(stand_in: StandIn) -> collections.Counter:
    return collections.Counter(QUESTION.search(prompt).group(0) for _, prompt in stand_in.arrivals)


@pytest.fixture
def teachers():
    made = []

    def make(answer, **kwargs) -> StandIn:
        made.append(StandIn(answer=answer, **kwargs))
        return made[-1]

    yield make
    for stand_in in made:
        stand_in.close()


def until_recipe(tmp_path, prompts_file, base_urls, k, max_samples, **generate):
    generate = {"until_verified": {"k": k, "max_samples": max_samples}, **generate}
    recipe = write_recipe(tmp_path, base_urls, prompts_file, **generate)
    text = recipe.read_text().replace("  samples_per_prompt: 3\n", "")  # max_samples sets it
    recipe.write_text(text)
    return recipe


def test_a_teacher_always_right_gets_exactly_k_requests_per_prompt_across_two_endpoints(tmp_path, prompts_file,
                                                                                        teachers, capfd):
    first, second = teachers(right, delay_s=0.01), teachers(right, delay_s=0.01)
    recipe = until_recipe(tmp_path, prompts_file, [first.base_url, second.base_url], k=2, max_samples=6)
    stats = run_generate(load_recipe(recipe))
    sent = per_prompt(first) + per_prompt(second)
    assert len(sent) == 12 and set(sent.values()) == {2}, sent
    assert len(first.arrivals) and len(second.arrivals)  # both replicas served
    until = stats["until_verified"]
    assert until["prompts_solved"] == 12 and until["samples_verified"] == 24
    assert until["samples_per_prompt_histogram"] == {"2": 12}
    assert until["completion_tokens_per_verified"] == 4.0 and stats["samples_cap"] == 72
    manifest = read_manifest(tmp_path / "out")
    assert manifest["counts"]["prompts_solved"] == 12 and manifest["counts"]["samples"] == 24
    assert "verified 24/24 graded | prompts solved 12, exhausted 0 of 12" in capfd.readouterr().err

    # Decisions come from the ledger: a rerun sends nothing; k=3 sends exactly one more per prompt.
    run_generate(load_recipe(recipe))
    assert sum((per_prompt(first) + per_prompt(second)).values()) == 24
    run_generate(load_recipe(recipe, ["generate.until_verified.k=3"]))
    assert set((per_prompt(first) + per_prompt(second)).values()) == {3}


def test_a_teacher_always_wrong_gets_exactly_max_samples_and_the_job_completes(tmp_path, prompts_file, teachers):
    stand_in = teachers(wrong)
    recipe = until_recipe(tmp_path, prompts_file, [stand_in.base_url], k=1, max_samples=4, concurrency=16)
    stats = run_generate(load_recipe(recipe))
    assert set(per_prompt(stand_in).values()) == {4} and len(per_prompt(stand_in)) == 12
    assert stats["until_verified"]["prompts_exhausted"] == 12 and stats["until_verified"]["samples_verified"] == 0
    assert stats["until_verified"]["completion_tokens_per_verified"] is None
    assert read_manifest(tmp_path / "out")["complete"]


def test_kill_minus_9_then_resume_never_passes_max_samples_nor_samples_a_solved_prompt(tmp_path, prompts_file,
                                                                                        teachers):
    stand_in = teachers(right_one_time_in_three, delay_s=0.2)
    k, cap = 2, 5
    recipe = until_recipe(tmp_path, prompts_file, [stand_in.base_url], k=k, max_samples=cap, concurrency=4)
    samples_path = tmp_path / "out" / "samples.jsonl"
    process = subprocess.Popen([sys.executable, "-m", "cot_distill.cli", "generate", str(recipe)], cwd=REPO_ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            if samples_path.exists() and samples_path.read_bytes().count(b"\n") >= 16:
                break
            time.sleep(0.02)
        assert process.poll() is None, "the job ended before the kill; slow the stand-in down"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert read_manifest(tmp_path / "out") is None

    def verified_by_prompt() -> collections.Counter:
        golds = {f"p{i:02d}": str(2 * i + 1) for i in range(12)}
        return collections.Counter(sample["prompt_id"] for _, sample in iter_jsonl(samples_path)
                                   if grade(sample["content"], golds[sample["prompt_id"]]).correct)

    def samples_by_prompt() -> collections.Counter:
        return collections.Counter(sample["prompt_id"] for _, sample in iter_jsonl(samples_path))

    solved_at_kill = {prompt for prompt, count in verified_by_prompt().items() if count >= k}
    samples_at_kill = samples_by_prompt()
    result = run_cli("generate", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    samples, verified = samples_by_prompt(), verified_by_prompt()
    assert max(samples.values()) <= cap, samples
    assert all(samples[prompt] == samples_at_kill[prompt] for prompt in solved_at_kill)
    keys = [(s["prompt_id"], s["sample_idx"]) for _, s in iter_jsonl(samples_path)]
    assert len(keys) == len(set(keys))  # every sample exactly once
    # Every prompt ends solved (k verified) or out of samples (cap samples), never in between.
    assert all(verified[prompt] >= k or samples[prompt] == cap for prompt in samples)
    assert read_manifest(tmp_path / "out")["complete"]


def test_the_budget_stops_the_job_and_a_higher_cap_continues_it(tmp_path, prompts_file, teachers):
    stand_in = teachers(wrong, delay_s=0.01)
    price = {"prompt": 1000.0, "completion": 2000.0}  # USD per million: 5 + 4 tokens per sample cost $0.013
    recipe = write_recipe(tmp_path, [stand_in.base_url], prompts_file, concurrency=2,
                          budget={"max_completion_tokens": 40, "price_per_mtok": price})
    with pytest.raises(GenerateError, match=r"the budget is reached: generate.budget.max_completion_tokens=40"):
        run_generate(load_recipe(recipe))
    out = tmp_path / "out"
    stats = read_json(out / "stats.json")
    assert read_manifest(out) is None
    assert 10 <= stats["samples_done"] <= 12  # 10 samples reach 40 tokens; the 2 in flight still land
    assert stats["budget"]["completion_tokens"] == 4 * stats["samples_done"]
    assert stats["budget"]["usd"] == pytest.approx(0.013 * stats["samples_done"])

    # The same cap again: nothing is sent.
    sent = len(stand_in.arrivals)
    with pytest.raises(GenerateError, match="the budget is reached"):
        run_generate(load_recipe(recipe))
    assert len(stand_in.arrivals) == sent

    stats = run_generate(load_recipe(recipe, ["generate.budget.max_completion_tokens=1000"]))
    assert stats["samples_done"] == 36 and len(stand_in.arrivals) == 36
    assert read_manifest(out)["complete"]


def test_max_usd_stops_an_until_verified_job(tmp_path, prompts_file, teachers, capfd):
    stand_in = teachers(wrong, delay_s=0.01)
    recipe = until_recipe(tmp_path, prompts_file, [stand_in.base_url], k=1, max_samples=3, concurrency=1,
                          budget={"max_usd": 0.05, "price_per_mtok": {"prompt": 1000.0, "completion": 2000.0}})
    with pytest.raises(GenerateError, match=r"max_usd=0.05 \(\$0\.05"):
        run_generate(load_recipe(recipe))
    assert len(stand_in.arrivals) == 4  # $0.013 each: the 4th reaches $0.052
    assert "spent 36 tok, $0.0520" in capfd.readouterr().err


@pytest.mark.parametrize("generate, message", [
    ({"until_verified": {"k": 1, "max_samples": 4}, "samples_per_prompt": 3},
     "samples_per_prompt (3) differs from until_verified.max_samples (4)"),
    ({"until_verified": {"k": 5, "max_samples": 4}}, "k (5) is above max_samples (4)"),
    ({"budget": {"max_usd": 1.0}}, "max_usd needs price_per_mtok"),
])
def test_until_verified_and_budget_settings_are_checked(tmp_path, prompts_file, generate, message):
    recipe = write_recipe(tmp_path, ["http://unused/v1"], prompts_file, **generate)
    if "samples_per_prompt" not in generate:
        recipe.write_text(recipe.read_text().replace("  samples_per_prompt: 3\n", ""))
    result = run_cli("generate", str(recipe))
    assert result.returncode == 2 and message in result.stderr


def test_until_verified_needs_gold_answers(tmp_path, teachers):
    prompts = tmp_path / "no-gold.jsonl"
    prompts.write_text('{"id": "a", "problem": "What is 1 + 2?"}\n')
    recipe = until_recipe(tmp_path, prompts, [teachers(right).base_url], k=1, max_samples=2)
    with pytest.raises(Exception, match="1 prompts have none"):
        run_generate(load_recipe(recipe, ["data.fields.answer=null"]))
