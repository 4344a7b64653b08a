"""generate at scale from a small client: time to the first sample, peak memory, and a resume over a big ledger.

A stand-in OpenAI-compatible server that answers at once (tests/stand_in.py) takes the place of the teacher: the
client's own costs are under test, not a model's. `cot-distill generate` runs as a subprocess, and its peak RSS
(VmHWM) is read from /proc when it ends.

- Run 1, 1M prompts x 4 samples (by default) on an empty folder: seconds from the command's start to the first
  line in samples.jsonl. generate.budget.max_completion_tokens stops it after a few samples, and its end then
  walks every remaining request to count the job (the same work a full run does by its end), so its peak RSS
  includes the job's whole key set.
- Run 2, the same job over a ledger that already holds the first --ledger samples (written here with the job's
  own keys): seconds from the command's start to the first request the server sees, which must skip them all.

    .venv/bin/python benchmarks/generate_scale.py [--prompts 1000000] [--samples 4] [--ledger 1000000]

Last line: RESULT first_sample_s=... peak_rss_gb=... resume_first_request_s=... (goals: <= 20, <= 1.5, <= 30).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from cot_distill.config import load_recipe  # noqa: E402
from cot_distill.data import PromptStream  # noqa: E402
from cot_distill.generate import RequestPlan  # noqa: E402
from cot_distill.prompts import load_template  # noqa: E402

from stand_in import StandIn  # noqa: E402


def write_prompts(path: Path, count: int) -> None:
    with open(path, "w") as handle:
        for index in range(count):
            handle.write(f'{{"id": "q{index}", "problem": "What is {index} + 1?", "answer": "{index + 1}"}}\n')


def write_recipe(folder: Path, base_url: str, prompts: Path, samples: int, cap: int) -> Path:
    recipe = {
        "name": "scale",
        "teacher": {"model": "tiny-teacher", "base_urls": [base_url], "request_timeout_s": 60},
        "data": {"prompts": str(prompts), "fields": {"id": "id", "problem": "problem", "answer": "answer"}},
        "generate": {"output_dir": str(folder / "out"), "samples_per_prompt": samples, "concurrency": 64,
                     "sampling": {"temperature": 0.6, "top_p": 1.0, "max_tokens": 16}, "progress_interval_s": 5,
                     "budget": {"max_completion_tokens": cap}},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def write_ledger(recipe_path: Path, count: int) -> None:
    """The first `count` samples of the job, as generate would have written them (usage: 1 completion token)."""
    recipe = load_recipe(recipe_path)
    template = load_template(recipe.generate.prompt_template)
    # The identity generate computes for this teacher: what the stand-in reports in /v1/models.
    from cot_distill.teachers.identity import teacher_identity

    plan = RequestPlan(PromptStream(recipe.data), template, recipe.teacher, recipe.generate,
                       teacher_identity(recipe.teacher))
    out = Path(recipe.generate.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "samples.jsonl", "w") as handle:
        for index, request in enumerate(plan):
            if index >= count:
                break
            handle.write(json.dumps({
                "prompt_id": request.prompt_id, "sample_idx": request.sample_idx, "request_key": request.key,
                "teacher": "tiny-teacher", "params": request.params, "template_hash": template.hash,
                "reasoning": "ok", "content": "1", "text": "<think>ok</think>1", "reasoning_closed": True,
                "finish_reason": "stop", "usage": {"prompt_tokens": 5, "completion_tokens": 1}, "latency_s": 0.01,
                "attempts": 1, "created_at": "2026-12-03T00:00:00Z"}) + "\n")


def run_generate(recipe: Path, watch) -> tuple[float | None, float]:
    """(seconds until watch() first returns true, peak RSS in GB) of one `cot-distill generate` run."""
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "cot_distill.cli", "generate", str(recipe)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen, peak_kb = None, 0
    while process.poll() is None:
        if seen is None and watch():
            seen = time.monotonic() - started
        try:
            status = Path(f"/proc/{process.pid}/status").read_text()
            peak_kb = max(peak_kb, int(status.split("VmHWM:")[1].split()[0]))
        except (OSError, IndexError):
            pass
        time.sleep(0.05)
    stderr = process.stderr.read()
    if "the budget is reached" not in stderr:
        raise SystemExit(f"generate did not stop at its budget:\n{stderr[-3000:]}")
    return seen, peak_kb / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=1_000_000)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--ledger", type=int, default=1_000_000)
    args = parser.parse_args()
    server = StandIn()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            prompts = folder / "prompts.jsonl"
            write_prompts(prompts, args.prompts)
            samples = folder / "out" / "samples.jsonl"
            recipe = write_recipe(folder, server.base_url, prompts, args.samples, cap=40)
            first_sample, peak = run_generate(recipe, lambda: samples.exists() and samples.stat().st_size > 0)
            print(f"run 1: {args.prompts:,} prompts x {args.samples}: first sample after {first_sample:.1f} s, "
                  f"peak RSS {peak:.2f} GB", flush=True)

            os.remove(samples)
            write_ledger(recipe, args.ledger)
            # The ledger's own spend is 1 token a sample: a cap just above it lets a few new requests through.
            recipe = write_recipe(folder, server.base_url, prompts, args.samples, cap=args.ledger + 40)
            arrivals = len(server.arrivals)
            first_request, resume_peak = run_generate(recipe, lambda: len(server.arrivals) > arrivals)
            print(f"run 2: over a {args.ledger:,}-sample ledger: first new request after {first_request:.1f} s, "
                  f"peak RSS {resume_peak:.2f} GB", flush=True)
    finally:
        server.close()
    print(f"RESULT first_sample_s={first_sample:.1f} peak_rss_gb={max(peak, resume_peak):.2f} "
          f"resume_first_request_s={first_request:.1f}")


if __name__ == "__main__":
    main()
