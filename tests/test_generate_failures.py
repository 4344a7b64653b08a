"""Permanent failures, Retry-After and teacher identity, against a stand-in OpenAI-compatible server (stand_in.py):
it must answer 429 with Retry-After, reject one chosen prompt and change the `root` it reports between runs, which
a real server does not do on demand.
"""

from __future__ import annotations

import time

import pytest

from cot_distill.config import load_recipe
from cot_distill.generate import GenerateError, request_key, run_generate
from cot_distill.records import iter_jsonl, read_json, read_manifest
from cot_distill.teachers.openai_compat import parse_retry_after

from conftest import write_recipe
from stand_in import StandIn


@pytest.fixture
def stand_in():
    server = StandIn()
    yield server
    server.close()


def recipe_with_bad_prompt(tmp_path, prompts_file, stand_in, **overrides):
    with prompts_file.open("a") as handle:
        handle.write('{"id": "bad", "problem": "REJECT me", "answer": "1"}\n')
    return write_recipe(tmp_path, [stand_in.base_url], prompts_file, samples_per_prompt=1, **overrides)


def test_a_rejected_prompt_is_recorded_once_and_the_job_completes(tmp_path, prompts_file, stand_in, capsys):
    recipe = recipe_with_bad_prompt(tmp_path, prompts_file, stand_in, max_failed_fraction=0.1)
    stats = run_generate(load_recipe(recipe))
    out = tmp_path / "out"
    failures = [record for _, record in iter_jsonl(out / "failures.jsonl")]
    assert [(f["prompt_id"], f["permanent"], f["status"], f["attempts"]) for f in failures] == [("bad", True, 400, 1)]
    assert stats["samples_done"] == 12 and stats["samples_failed_permanently"] == 1
    assert "longer than the model's context" in next(iter(stats["permanent_failure_reasons"]))
    manifest = read_manifest(out)
    assert manifest["counts"]["failed_permanently"] == 1 and manifest["counts"]["samples"] == 12

    run_generate(load_recipe(recipe))  # a rerun does not resend it
    assert stand_in.sent("REJECT") == 1 and len(list(iter_jsonl(out / "failures.jsonl"))) == 1
    assert "not resent (--retry-failed resends them)" in capsys.readouterr().err
    run_generate(load_recipe(recipe, ["generate.retry_failed=true"]))
    assert stand_in.sent("REJECT") == 2 and read_manifest(out) is not None


def test_rejections_above_the_limit_fail_loudly_without_a_manifest(tmp_path, prompts_file, stand_in):
    recipe = recipe_with_bad_prompt(tmp_path, prompts_file, stand_in)  # default 0.01 of 13 requests: none allowed
    with pytest.raises(GenerateError, match="rejected 1 of 13 requests for good"):
        run_generate(load_recipe(recipe))
    out = tmp_path / "out"
    assert read_manifest(out) is None and read_json(out / "stats.json")["samples_failed_permanently"] == 1


def test_a_wrong_parameter_stops_the_job_early(tmp_path, prompts_file, stand_in):
    """Every request rejected: the job stops once it cannot end within the limit, not after every request."""
    path = tmp_path / "all-bad.jsonl"
    path.write_text("".join(f'{{"id": "p{i}", "problem": "REJECT {i}", "answer": "1"}}\n' for i in range(200)))
    recipe = write_recipe(tmp_path, [stand_in.base_url], path, samples_per_prompt=1, concurrency=2,
                          max_failed_fraction=0.02)
    with pytest.raises(GenerateError, match="rejected 5 of 200"):
        run_generate(load_recipe(recipe))
    assert stand_in.sent("REJECT") <= 7  # 5 over the limit of 4, plus what was in flight


def test_retry_after_is_honoured_and_capped(tmp_path, prompts_file):
    stand_in = StandIn(throttle_first=1, retry_after="1")
    try:
        recipe = write_recipe(tmp_path, [stand_in.base_url], prompts_file, samples_per_prompt=1, concurrency=1,
                              backoff_initial_s=0.05, backoff_max_s=5.0)
        stats = run_generate(load_recipe(recipe))
    finally:
        stand_in.close()
    gap = stand_in.arrivals[1][0] - stand_in.arrivals[0][0]
    assert gap >= 0.95, f"retried {gap:.2f} s after a 429 with Retry-After: 1"
    assert stats["samples_done"] == 12 and stats["retries_this_run"] == 1


def test_parse_retry_after_reads_seconds_and_http_dates():
    from datetime import datetime, timezone

    now = datetime(2026, 12, 2, 12, 0, 0, tzinfo=timezone.utc)
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("Wed, 02 Dec 2026 12:00:30 GMT", now) == 30.0
    assert parse_retry_after("Wed, 02 Dec 2026 11:00:00 GMT", now) == 0.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None


def test_new_weights_behind_the_same_name_give_new_samples(tmp_path, prompts_file, stand_in, capsys):
    recipe = write_recipe(tmp_path, [stand_in.base_url], prompts_file, samples_per_prompt=1)
    run_generate(load_recipe(recipe))
    assert len(stand_in.arrivals) == 12
    run_generate(load_recipe(recipe))
    assert len(stand_in.arrivals) == 12  # same weights: nothing resent

    stand_in.root = "/models/b"
    run_generate(load_recipe(recipe))
    assert len(stand_in.arrivals) == 24
    err = capsys.readouterr().err
    assert "12 samples" in err and "by other weights" in err and "/models/a" in err
    samples = [record for _, record in iter_jsonl(tmp_path / "out" / "samples.jsonl")]
    assert {record["teacher_identity"]["root"] for record in samples} == {"/models/a", "/models/b"}


def test_an_empty_identity_keeps_the_keys_of_older_ledgers(tmp_path, prompts_file):
    teacher = load_recipe(write_recipe(tmp_path, ["http://x/v1"], prompts_file)).teacher
    args = ([{"role": "user", "content": "q"}], teacher, {"temperature": 0.6}, "t" * 16, 0)
    assert request_key(*args) == request_key(*args, {})
    assert request_key(*args) != request_key(*args, {"root": "/m"}) != request_key(*args, {"root": "/n"})


def test_rate_limit_holds_requests_and_tokens_to_the_minute():
    """aiolimiter's buckets hold one minute's allowance: the 61st request of a 60/min limit waits about 1 s, and a
    request that used more tokens than it reserved takes the shortfall before the next one goes."""
    import asyncio

    from cot_distill.config import RateLimitSection
    from cot_distill.records import Completion
    from cot_distill.teachers.window import RateLimiter

    async def timed(limiter: RateLimiter, attempts: int) -> float:
        started = time.monotonic()
        for _ in range(attempts):
            await limiter.before_attempt()
        return time.monotonic() - started

    requests = RateLimiter(RateLimitSection(requests_per_minute=60), max_tokens=10)
    assert 0.8 <= asyncio.run(timed(requests, 61)) < 3

    tokens = RateLimiter(RateLimitSection(tokens_per_minute=600), max_tokens=300)

    async def over_budget() -> float:
        reserved = await tokens.before_attempt()  # 300 of 600
        await tokens.settle(reserved, Completion("x", None, "x", True, "stop", 10, 300))  # used 310: 10 more
        return await timed(tokens, 1)  # reserves the mean, 310: 310 + 310 > 600, waits 20 tokens, 2 s at 10/s

    assert 1.5 <= asyncio.run(over_budget()) < 6


def test_a_ledger_of_another_job_does_not_shrink_the_window(tmp_path, prompts_file):
    """The window starts min(concurrency, job size) workers, however many samples of other parameters the ledger
    holds (a streamed job cannot count its pending requests up front)."""
    stand_in = StandIn(delay_s=0.2)
    try:
        recipe = write_recipe(tmp_path, [stand_in.base_url], prompts_file, samples_per_prompt=3, concurrency=8)
        run_generate(load_recipe(recipe))  # 36 samples of temperature 0.8
        stand_in.max_in_flight = 0
        run_generate(load_recipe(recipe, ["generate.sampling.temperature=0.5", "generate.samples_per_prompt=1"]))
    finally:
        stand_in.close()
    assert len(stand_in.arrivals) == 48 and stand_in.max_in_flight >= 4  # one worker (the bug) gives 1
