"""What a training step costs under each method, on the demo's student: sft, kd with the live teacher in memory,
and kd from recorded top-K log-probabilities (kd.teacher: recorded, no teacher in memory).

    python benchmarks/kd_step_cost.py                 # ~8 min on 2 CPU cores
    python benchmarks/kd_step_cost.py --k 20 --rounds 3 --steps 4
    python benchmarks/kd_step_cost.py --modes sft,kd_recorded,kd_recorded_tuned,kd_recorded_onechunk --rounds 1

Student: the demo's (SmolLM2-135M-Instruct's layers 0, 2, 3, 5, ... 29: 20 of 30, built by init_from); live
teacher: SmolLM2-135M-Instruct. Data: demo-shaped conversations (an arithmetic question, a ~150-token reply of
words, lognormal lengths) tokenized by SmolLM2's tokenizer; their records hold those token ids and K random
alternatives per position with log-probabilities (the loss's cost does not depend on the values). Batches of 16,
max_length 512, the demo's sft settings. Each mode runs in a fresh process; modes alternate round by round. The
first `--warmup` steps are not timed; seconds per step is the best round's mean, and each mode's paired ratio is
the median over rounds of its s/step over the same round's sft (a machine whose speed drifts between rounds moves
both). Peak RSS is the process's (ru_maxrss). Last line: RESULT recorded_vs_sft=<best-round s/step ratio>
live_vs_sft=<ratio> bytes_per_token=<store size / tokens>.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = ("sft", "kd_live", "kd_recorded")
# Variants of kd_recorded (--modes sft,kd_recorded,kd_recorded_tuned,...): which setting its extra cost comes from.
VARIANTS = {"kd_recorded_tuned": {"tune_cpu_allocator": True},  # glibc keeps freed memory, as sft's default does
            "kd_recorded_onechunk": {"kd": {"chunk_tokens": 65536}},  # no recompute of chunks in backward
            "kd_recorded_both": {"tune_cpu_allocator": True, "kd": {"chunk_tokens": 65536}}}
DEMO_LAYERS = [0, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 23, 24, 26, 27, 29]
WORDS = ("we add the first number to the second so the sum is then check carry digit result answer equals "
         "therefore because next value total").split()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=96)
    parser.add_argument("--k", type=int, default=20, help="recorded top-K (generate.logprobs)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "WORKDIR"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def build_data(workdir: Path, examples: int, k: int) -> tuple[Path, float]:
    """rows.jsonl with demo-shaped conversations, each linked to its record in logprobs.bin; returns the path and
    the store's bytes per recorded token."""
    import numpy as np
    from transformers import AutoTokenizer

    from cot_distill.assets import resolve_model_path
    from cot_distill.logprob_store import LogprobWriter, TokenLogprobs

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))
    rng, pyrandom = np.random.default_rng(0), random.Random(0)
    rows, tokens, store = [], 0, workdir / "logprobs.bin"
    store.unlink(missing_ok=True)
    with LogprobWriter(store) as writer:
        for index in range(examples):
            a, b = pyrandom.randint(1, 9), pyrandom.randint(1, 9)
            words = max(8, int(pyrandom.lognormvariate(4.6, 0.5)))  # median ~100 words, ~150 tokens
            reply = " ".join(pyrandom.choice(WORDS) for _ in range(words)) + f". The answer is {a + b}."
            ids = tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            topk = rng.integers(0, len(tokenizer), (len(ids), k)).astype(np.int32)
            topk[:, 0] = ids  # the sampled token first, as vLLM lists it
            logprobs = np.sort(-rng.exponential(2.0, (len(ids), k)).astype(np.float32), axis=1)[:, ::-1]
            key = f"{index:064x}"
            link = writer.append(key, TokenLogprobs(np.asarray(ids, np.int32), topk, np.ascontiguousarray(logprobs)))
            rows.append({"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                      {"role": "assistant", "content": reply}],
                         "prompt_id": f"p{index}", "teacher_logprobs": {**link, "request_key": key}})
            tokens += len(ids)
    path = workdir / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path, store.stat().st_size / tokens


def child(mode: str, workdir: Path, args: argparse.Namespace) -> None:
    import resource
    import time

    from transformers import TrainerCallback

    from cot_distill.config.train import TrainSection
    from cot_distill.train import run_train

    steps = args.warmup + args.steps
    section = {"init_from": {"model": "smollm2-135m", "keep_layers": DEMO_LAYERS}, "dataset": str(workdir / "rows.jsonl"),
               "output_dir": str(workdir / f"train-{mode}"), "resume": False,
               "sft": {"max_steps": steps, "per_device_train_batch_size": args.batch_size, "learning_rate": 2e-4,
                       "logging_steps": 1, "save_strategy": "no", "max_length": 512, "seed": 0}}
    if mode != "sft":
        section.update(method="kd", kd={"teacher": "smollm2-135m" if mode == "kd_live" else "recorded"})
    variant = VARIANTS.get(mode, {})
    section.update({key: value for key, value in variant.items() if key != "kd"})
    section["kd"] = {**section.get("kd", {}), **variant.get("kd", {})} if mode != "sft" else None
    if section["kd"] is None:
        del section["kd"]
    stamps: list[float] = []

    class Stamps(TrainerCallback):
        def on_step_end(self, *_, **__):
            stamps.append(time.perf_counter())

        def on_step_begin(self, *_, **__):
            if not stamps:
                stamps.append(time.perf_counter())

    run_train(TrainSection.model_validate(section), {}, callbacks=[Stamps()])
    timed = stamps[args.warmup:]  # stamps[w] ends the last warm-up step
    per_step = (timed[-1] - timed[0]) / (len(timed) - 1)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print("CHILD " + json.dumps({"mode": mode, "s_per_step": per_step, "peak_rss_gb": peak_gb}), flush=True)


def run_child(mode: str, command: list[str]) -> dict:
    """One mode measured in a fresh process (no allocator or compile state carried over): its CHILD line."""
    done = subprocess.run(command, capture_output=True, text=True)
    line = next((line for line in done.stdout.splitlines() if line.startswith("CHILD ")), None)
    if line is None:
        raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(line[len("CHILD "):])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args.child[0], Path(args.child[1]), args)
        return
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kd_step_cost_"))
    workdir.mkdir(parents=True, exist_ok=True)
    _, bytes_per_token = build_data(workdir, args.examples, args.k)
    modes = args.modes.split(",")
    results: dict[str, list[dict]] = {mode: [] for mode in modes}
    for round_index in range(args.rounds):
        order = modes if round_index % 2 == 0 else list(reversed(modes))
        for mode in order:
            command = [sys.executable, __file__, "--child", mode, str(workdir), "--warmup", str(args.warmup),
                       "--steps", str(args.steps), "--batch-size", str(args.batch_size)]
            result = run_child(mode, command)
            results[mode].append(result)
            print(f"round {round_index + 1} {mode:12s} {result['s_per_step']:.2f} s/step, peak RSS "
                  f"{result['peak_rss_gb']:.2f} GB", flush=True)
    best = {mode: min(r["s_per_step"] for r in runs) for mode, runs in results.items()}
    peak = {mode: max(r["peak_rss_gb"] for r in runs) for mode, runs in results.items()}
    for mode in modes:
        paired = [run["s_per_step"] / sft["s_per_step"] for run, sft in zip(results[mode], results["sft"])]
        print(f"{mode:12s} best {best[mode]:.2f} s/step ({best[mode] / best['sft']:.2f}x sft; paired with each "
              f"round's sft: median {statistics.median(paired):.2f}x, {min(paired):.2f}-{max(paired):.2f}), peak RSS "
              f"{peak[mode]:.2f} GB", flush=True)
    print(f"recorded store: {bytes_per_token:.0f} bytes per token at K={args.k}")
    names = {"kd_recorded": "recorded", "kd_live": "live", **{mode: mode.removeprefix("kd_") for mode in VARIANTS}}
    ratios = [f"{names[mode]}_vs_sft={best[mode] / best['sft']:.3f}" for mode in modes if mode in names]
    print("RESULT " + " ".join(ratios) + f" bytes_per_token={bytes_per_token:.0f}")


if __name__ == "__main__":
    main()
