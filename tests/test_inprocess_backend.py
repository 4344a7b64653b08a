"""The in-process vLLM backend (teachers/vllm_engine.py) on the tiny real model: no batch barrier, a latency per
request, timeouts retried then recorded, an over-long prompt rejected for good while the rest go on, and a kill -9
then a resume that gives every sample exactly once.

An engine start costs 35-60 s on a 2-core machine, so the file starts three: one for the direct runs (both
scenarios share it) and two for the kill and the resume. The direct runs go through a small script in a
subprocess: the engine spawns worker processes, which wants a `__main__` guard and keeps them out of pytest.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cot_distill.records import iter_jsonl, read_manifest

from conftest import REPO_ROOT, SERVED_NAME, run_cli, write_recipe

pytestmark = pytest.mark.integration

ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
# enforce_eager: no torch.compile, so a start takes ~35 s instead of ~85 s (config.LaunchSection.enforce_eager).
ENGINE_KWARGS = {"max_model_len": 512, "enforce_eager": True}
WINDOW = 4
SHORT = 10  # requests of 8 tokens beside one of 400: more than two windows' worth

DRIVER = """
import json, sys
from cot_distill.config import GenerateSection, TeacherSection
from cot_distill.records import SampleRequest
from cot_distill.teachers.vllm_engine import run_on_engine, start_engine
from cot_distill.teachers.window import WindowEvents


def request(key, content, max_tokens):
    params = {"temperature": 1.0, "top_p": 1.0, "max_tokens": max_tokens, "seed": None, "stop": None,
              "extra_body": {"ignore_eos": True}}  # every completion has exactly max_tokens tokens
    return SampleRequest(key, 0, [{"role": "user", "content": content}], params, key)


def drive(llm, teacher, gen, pending):
    \"\"\"Every event in order, and before each engine step how many requests are in the engine and how many
    requests have had their outcome (a sample or a failure).\"\"\"
    log, steps, engine = [], [], llm.llm_engine
    outcomes = lambda: sum(entry[0] in ("sample", "failure") for entry in log)
    real_step = engine.step
    engine.step = lambda: (steps.append([engine.get_num_unfinished_requests(), outcomes()]), real_step())[1]
    events = WindowEvents(
        on_sample=lambda r, c, latency, attempts, endpoint: log.append(
            ["sample", r.key, latency, attempts, c.completion_tokens, endpoint]),
        on_failure=lambda r, error, attempts, permanent, status: log.append(
            ["failure", r.key, error, attempts, permanent, status]),
        on_error=lambda error, will_retry: log.append(["error", error, will_retry]),
        on_ready=lambda: None,
        on_tick=lambda in_flight: log.append(["tick", in_flight]))
    run_on_engine(llm, teacher, gen, pending, events)
    engine.step = real_step
    return {"log": log, "steps": steps, "left_in_engine": engine.get_num_unfinished_requests()}


def drive_until_verified(llm, teacher, window):
    # generate.until_verified through the step loop: 2 prompts, k=1, max_samples=3. The tiny model never states a
    # boxed answer, so each prompt gets exactly 3 samples, one at a time (open + verified < k): the loop must wait
    # on verdicts, not end, while the queue has nothing to hand out.
    from cot_distill.config import CorrectnessFilter, UntilVerifiedSection
    from cot_distill.generate.ledger import make_sample
    from cot_distill.generate.until_verified import VerdictThread, VerifiedQueue, open_grader

    pending = [SampleRequest(f"u{p}", i, [{"role": "user", "content": f"What is {p} + {i}?"}],
                             request(f"u{p}", "", 8).params, f"u{p}#{i}") for p in range(2) for i in range(3)]
    queue = VerifiedQueue.build(pending, ["u0", "u1"], UntilVerifiedSection(k=1, max_samples=3), {})
    grader = open_grader(CorrectnessFilter())
    verdicts = VerdictThread(queue, grader, {"u0": "1", "u1": "1"})
    samples, steps, engine = [], [], llm.llm_engine
    real_step = engine.step
    engine.step = lambda: (steps.append(engine.get_num_unfinished_requests()), real_step())[1]

    def on_sample(r, c, latency, attempts, endpoint):
        samples.append(r.prompt_id)
        verdicts.submit(make_sample(r, c, "tiny", "t", latency, attempts, endpoint))
    events = WindowEvents(on_sample=on_sample, on_failure=lambda *args: samples.append("failure"),
                          on_error=lambda *args: None, on_ready=lambda: None, on_tick=lambda in_flight: None)
    run_on_engine(llm, teacher, GenerateSection(concurrency=window), queue, events)
    engine.step = real_step
    verdicts.close()
    grader.close()
    return {"samples": samples, "max_in_engine": max(steps), "summary": queue.summary()}


if __name__ == "__main__":
    model, window, short, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    teacher = TeacherSection(backend="vllm", model=model, engine_kwargs=json.loads(sys.argv[5]), request_timeout_s=600)
    llm = start_engine(teacher)
    mixed = [request("long", "Tell a story.", 400), request("too-long", "word " * 700, 8),
             *(request(f"short{i}", f"What is {i} + 1?", 8) for i in range(short))]
    results = {"mixed": drive(llm, teacher, GenerateSection(concurrency=window), mixed)}
    # A timeout no request can meet: each attempt is aborted after its first steps, then retried once.
    hasty = teacher.model_copy(update={"request_timeout_s": 0.05})
    stuck = [request(f"stuck{i}", "Count to a thousand.", 400) for i in range(2)]
    results["timeouts"] = drive(llm, hasty, GenerateSection(concurrency=window, max_attempts=2), stuck)
    results["until_verified"] = drive_until_verified(llm, teacher, window)
    with open(out, "w") as handle:
        json.dump(results, handle)
"""


@pytest.fixture(scope="module")
def driven(tiny_model_dir, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("inprocess")
    script, out = folder / "drive.py", folder / "results.json"
    script.write_text(DRIVER)
    result = subprocess.run([sys.executable, str(script), str(tiny_model_dir), str(WINDOW), str(SHORT), str(out),
                             json.dumps(ENGINE_KWARGS)], cwd=REPO_ROOT, env={**os.environ, **ENGINE_ENV},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def events_of(log: list, kind: str) -> list:
    return [entry[1:] for entry in log if entry[0] == kind]


def test_no_barrier_the_window_stays_full_and_each_request_has_its_own_latency(driven):
    """The chunked backend this replaced fails each assertion: it reported a chunk only once its longest trace
    ended, with the chunk's wall time as every request's latency, and its window drained to that one trace."""
    run = driven["mixed"]
    samples = {key: (latency, attempts, tokens, endpoint) for key, latency, attempts, tokens, endpoint
               in events_of(run["log"], "sample")}
    assert set(samples) == {"long", *(f"short{i}" for i in range(SHORT))}
    assert samples["long"][2] == 400 and all(samples[f"short{i}"][2] == 8 for i in range(SHORT))
    assert all(attempts == 1 and endpoint is None for _, attempts, _, endpoint in samples.values())
    # Every short request, also those added after the first window, finished while the long one still ran...
    assert [key for key, *_ in events_of(run["log"], "sample")][-1] == "long"
    # ...and each is timed from its own add_request: far shorter than the long one, which spans them all.
    assert max(samples[f"short{i}"][0] for i in range(SHORT)) < samples["long"][0] / 4
    # Before every step the engine holds min(window, requests without an outcome yet): refilled at once.
    total = SHORT + 2
    assert run["steps"], "the engine never stepped"
    assert all(in_engine == min(WINDOW, total - outcomes) for in_engine, outcomes in run["steps"]), run["steps"]
    assert run["left_in_engine"] == 0


def test_an_over_long_prompt_fails_for_good_and_the_others_are_written(driven):
    log = driven["mixed"]["log"]
    (failure,) = events_of(log, "failure")
    key, error, attempts, permanent, status = failure
    assert (key, attempts, permanent, status) == ("too-long", 1, True, None)
    assert "maximum context length is 512" in error
    assert [error, False] in events_of(log, "error")  # reported once, not retried
    assert len(events_of(log, "sample")) == SHORT + 1
    assert len(events_of(log, "tick")) == SHORT + 2  # one per request that ended, the rejected one included


def test_a_request_past_the_timeout_is_aborted_retried_and_then_a_transient_failure(driven):
    run = driven["timeouts"]
    assert not events_of(run["log"], "sample")
    failures = events_of(run["log"], "failure")
    assert sorted(key for key, *_ in failures) == ["stuck0", "stuck1"]
    assert all(attempts == 2 and permanent is False and status is None for _, _, attempts, permanent, status
               in failures)
    assert all("TimeoutError" in error and "teacher.request_timeout_s" in error for _, error, *_ in failures)
    errors = events_of(run["log"], "error")
    assert sorted(will_retry for _, will_retry in errors) == [False, False, True, True]
    assert run["left_in_engine"] == 0  # the timed-out attempts were aborted, not left generating


def test_until_verified_through_the_step_loop_waits_on_verdicts(driven):
    run = driven["until_verified"]
    assert sorted(run["samples"]) == ["u0"] * 3 + ["u1"] * 3
    assert run["max_in_engine"] <= 2  # one open request per prompt: k=1 and nothing verified
    assert run["summary"]["prompts_exhausted"] == 2 and run["summary"]["samples_graded"] == 6


def samples_of(out_dir: Path) -> list[dict]:
    return [obj for _, obj in iter_jsonl(out_dir / "samples.jsonl")]


def in_process_recipe(tmp_path: Path, model: Path, prompts: Path, **generate) -> Path:
    recipe = write_recipe(tmp_path, ["http://unused/v1"], prompts, **generate)
    engine_kwargs = ", ".join(f"{key}: {json.dumps(value)}" for key, value in ENGINE_KWARGS.items())
    recipe.write_text(recipe.read_text().replace("backend: openai", "backend: vllm").replace(
        f"model: {SERVED_NAME}", f"model: {model}\n  engine_kwargs: {{{engine_kwargs}}}"))
    return recipe


def wait_until_gone(process_group: int, timeout_s: float = 30) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(process_group, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def test_kill_minus_9_mid_run_then_resume_gives_each_sample_exactly_once(tmp_path, tiny_model_dir):
    prompts = tmp_path / "many.jsonl"
    prompts.write_text("".join(f'{{"id": "q{i}", "problem": "Count to {i}.", "answer": "{i}"}}\n'
                               for i in range(50)))
    recipe = in_process_recipe(tmp_path, tiny_model_dir, prompts, samples_per_prompt=4, concurrency=8,
                               sampling={"temperature": 1.0, "top_p": 1.0, "max_tokens": 48})
    out = tmp_path / "out"
    samples_path = out / "samples.jsonl"
    # Its own session: the kill takes the engine's processes with it, as a kill of a job's process group would.
    process = subprocess.Popen([sys.executable, "-m", "cot_distill.cli", "generate", str(recipe)], cwd=REPO_ROOT,
                               env={**os.environ, **ENGINE_ENV}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            if samples_path.exists() and samples_path.read_bytes().count(b"\n") >= 20:
                break
            time.sleep(0.02)
        assert process.poll() is None, "the generator ended before it could be killed; make the job bigger"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert wait_until_gone(process.pid), "engine processes outlived the kill"
    assert read_manifest(out) is None
    lines_at_kill = samples_path.read_bytes().count(b"\n")
    assert 20 <= lines_at_kill < 200

    # A crash mid-write leaves a torn line; add the worst case to the real kill.
    with open(samples_path, "ab") as handle:
        handle.write(b'{"prompt_id": "q1", "sample_idx": 0, "request_key": "tor')
    result = run_cli("generate", str(recipe), env=ENGINE_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"the ledger holds {lines_at_kill} samples" in result.stderr
    counts = collections.Counter((s["prompt_id"], s["sample_idx"]) for s in samples_of(out))
    assert len(counts) == 200 and set(counts.values()) == {1}, {k: n for k, n in counts.items() if n != 1}
    assert read_manifest(out)["complete"]
    sample = samples_of(out)[-1]
    assert sample["usage"]["completion_tokens"] > 0 and sample["finish_reason"] in ("stop", "length")
    assert sample["latency_s"] > 0 and sample["teacher_identity"]
