"""Training throughput: our run_train path vs a bare TRL SFTTrainer vs a minimal PyTorch loop, and padding vs
padding-free vs packing, on the same student and the same long-tailed synthetic conversations.

    python benchmarks/train_throughput.py                      # small default, ~5 min on 2 CPU cores
    python benchmarks/train_throughput.py --hidden 384 --layers 14 --intermediate 1024 --heads 6 \
        --batch-size 8 --max-length 2048 --steps 2 --rounds 1   # 81M student, ~2k-token batches (~10 min)
    python benchmarks/train_throughput.py --modes ours,ours_fp32   # bf16 autocast vs fp32 on this CPU

Modes (each run is a fresh subprocess; modes alternate round by round so machine-load drift hits all alike):
  ours         run_train(cfg) with its CPU defaults: fp32 weights with bf16 autocast only where the CPU has native
               bf16 (bf16_autocast_on_cpu: auto), LM head only on the tokens that carry loss, no per-step TRL
               metrics, tuned allocator, padded batches
  trl          SFTTrainer(model=path, args=SFTConfig(...)) with TRL's defaults; only use_cpu=True is added, which
               TRL's default bf16=True requires on a CPU
  torch        the limit: a bare PyTorch loop doing ours' work with nothing around it, on the same tokenized, padded
               batches in the same order: the base model's last hidden states, the LM head only at the positions
               whose next token carries loss, fp32 token-mean cross-entropy, backward, grad-norm clip at 1.0 (the
               Trainer default ours keeps), fused AdamW step; the same autocast choice (bf16 where the CPU has
               it natively) and allocator tuning as ours
  ours_padfree run_train with sft.padding_free=true (a batch's examples concatenated, block-diagonal attention)
  ours_packed  run_train with sft.packing=true (BFD bins of max_length, one bin per step)
All use the sequential sampler over the same pre-shuffled data. tokens/s counts real (non-padding) tokens of the
timed steps (warm-up steps excluded), best round per mode; tokens/CPU-s is printed too.
Last line: RESULT train_vs_limit=<ours/torch> train_vs_bare_trl=<ours/trl> packing_gain=<ours_packed/ours>;
the padding-free vs padding ratio is printed just above it.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("ours", "trl", "torch", "ours_padfree", "ours_packed")
EXTRA_MODES = ("ours_fp32",)  # run with --modes ours,ours_fp32: is bf16 autocast faster on this CPU?
WORDS = ("the of and to in is we add sum number answer therefore so let compute check value equals first then "
         "next since because gives total result divide multiply subtract square root prime factor case").split()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--examples", type=int, default=96)
    parser.add_argument("--mean-words", type=int, default=120, help="median reasoning length (lognormal, sigma 0.9)")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--worker", choices=MODES + EXTRA_MODES, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------------ fixtures


def build_student(args, folder: Path) -> None:
    """A random Llama student with the Qwen3 tokenizer (151,669 tokens, tied embeddings like small Qwen3s)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from cot_distill.assets import qwen3_tokenizer_dir

    tokenizer = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=max(1, args.heads // 2), max_position_embeddings=args.max_length * 2,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    print(f"student: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params", flush=True)


def write_dataset(args, path: Path) -> None:
    """Curated-style rows whose reasoning length is long-tailed (lognormal), already in a fixed shuffled order."""
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as handle:
        for index in range(args.examples):
            words = min(int(rng.lognormvariate(math.log(args.mean_words), 0.9)) + 5, args.max_length // 2)
            reasoning = " ".join(rng.choices(WORDS, k=words))
            messages = [{"role": "user", "content": "Problem: " + " ".join(rng.choices(WORDS, k=25)) + "?"},
                        {"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n\nSo \\boxed{{{index}}}"}]
            handle.write(json.dumps({"messages": messages, "prompt_id": str(index)}) + "\n")


# ------------------------------------------------------------------------------------------------------- workers


def real_tokens(batch) -> int:
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["input_ids"].numel())


def make_recorder():
    """A TrainerCallback recording, at each step end, the time and the Trainer's count of non-padding tokens."""
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def __init__(self):
            self.step_ends, self.tokens, self._seen = [], [], 0

        def on_step_end(self, args, state, control, **kwargs):
            self.step_ends.append((time.perf_counter(), time.process_time()))
            self.tokens.append(state.num_input_tokens_seen - self._seen)
            self._seen = state.num_input_tokens_seen

    return Recorder()


def sft_settings(args, mode: str) -> dict:
    settings = dict(max_steps=args.warmup + args.steps, per_device_train_batch_size=args.batch_size,
                    max_length=args.max_length, train_sampling_strategy="sequential", save_strategy="no",
                    logging_steps=1000, report_to="none", seed=0, learning_rate=1e-4,
                    include_num_input_tokens_seen="non_padding")
    if mode == "ours_padfree":
        settings["padding_free"] = True
    if mode == "ours_packed":
        settings.update(packing=True, per_device_train_batch_size=1)
    if mode == "ours_fp32":
        settings["bf16"] = False
    return settings


def run_ours(args, work: Path, mode: str):
    from cot_distill.config.train import TrainSection
    from cot_distill.train import run_train

    recorder = make_recorder()
    cfg = TrainSection(student=str(work / "student"), dataset=str(work / "data.jsonl"),
                       output_dir=str(work / f"out-{mode}"), sft=sft_settings(args, mode), resume=False)
    run_train(cfg, {"benchmark": mode}, callbacks=[recorder])
    return recorder.step_ends, recorder.tokens


def run_bare_trl(args, work: Path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from cot_distill.records import iter_jsonl

    recorder = make_recorder()
    dataset = Dataset.from_list([{"messages": row["messages"]} for _, row in iter_jsonl(work / "data.jsonl")])
    config = SFTConfig(output_dir=str(work / "out-trl"), use_cpu=True, **sft_settings(args, "trl"))
    trainer = SFTTrainer(model=str(work / "student"), args=config, train_dataset=dataset, callbacks=[recorder])
    trainer.train()
    return recorder.step_ends, recorder.tokens


def run_torch_loop(args, work: Path):
    """The limit: what ours computes per step, written as a bare PyTorch loop (no Trainer, TRL or accelerate).

    Mirrors cot_distill.train.trainer.add_compact_lm_head and DistillSFTTrainer.compute_loss: the base model's last
    hidden states, the LM head only at the positions whose next token carries loss (labels[:, 1:] != -100), one fp32
    cross-entropy summed over those tokens and divided by their count (the Trainer's num_items_in_batch); then what
    the Trainer does around it with our settings: gradient clipping at max_grad_norm=1.0, fused AdamW, zero_grad."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from cot_distill.config.train import TrainSection
    from cot_distill.hardware import cpu_has_native_bf16
    from cot_distill.train import (
        IGNORE,
        find_end_of_turn,
        load_conversations,
        resolve_chat_template,
        tokenize_conversations,
        tune_cpu_allocator,
    )

    cfg = TrainSection(student=str(work / "student"), dataset=str(work / "data.jsonl"), output_dir=str(work / "x"))
    tokenizer = AutoTokenizer.from_pretrained(cfg.student)
    template, _ = resolve_chat_template(tokenizer, cfg)
    end_of_turn = find_end_of_turn(tokenizer, template, cfg.assistant_mask)
    dataset = tokenize_conversations(load_conversations(cfg.dataset), tokenizer, template, cfg, end_of_turn,
                                     args.max_length, None)
    collate = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    tune_cpu_allocator()  # the same process environment as run_train's CPU default
    model = AutoModelForCausalLM.from_pretrained(cfg.student, dtype=torch.float32).train()
    autocast = cpu_has_native_bf16()  # ours' CPU default (bf16_autocast_on_cpu: auto)
    head = model.get_output_embeddings()  # tied to the input embedding, as in the student
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)  # the Trainer's
    step_ends, tokens = [], []
    for step in range(args.warmup + args.steps):
        batch = collate([dataset[i] for i in range(step * args.batch_size, (step + 1) * args.batch_size)])
        tokens.append(real_tokens(batch))
        targets = batch.pop("labels")[:, 1:]  # position t predicts token t + 1
        scored = targets != IGNORE
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            hidden = model.model(**batch, use_cache=False).last_hidden_state
            logits = head(hidden[:, :-1][scored])
            loss = F.cross_entropy(logits.float(), targets[scored], reduction="sum") / scored.sum().clamp(min=1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        step_ends.append((time.perf_counter(), time.process_time()))
    return step_ends, tokens


def worker(args) -> None:
    work = Path(args.workdir)
    if args.worker == "trl":
        step_ends, tokens = run_bare_trl(args, work)
    elif args.worker == "torch":
        step_ends, tokens = run_torch_loop(args, work)
    else:
        step_ends, tokens = run_ours(args, work, args.worker)
    timed = slice(args.warmup, args.warmup + args.steps)
    (wall_end, cpu_end), (wall_start, cpu_start) = step_ends[timed.stop - 1], step_ends[timed.start - 1]
    print("BENCH " + json.dumps({"mode": args.worker, "tokens": sum(tokens[timed]), "seconds": wall_end - wall_start,
                                 "cpu_seconds": cpu_end - cpu_start}), flush=True)


# ---------------------------------------------------------------------------------------------------------- main


def run_mode(args, work: Path, mode: str) -> dict:
    forwarded = [f"--{key.replace('_', '-')}={value}" for key, value in vars(args).items()
                 if key not in ("worker", "workdir", "modes") and value is not None]
    command = [sys.executable, __file__, f"--worker={mode}", f"--workdir={work}", *forwarded]
    result = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("BENCH ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"{mode} failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1][len("BENCH "):])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="train_throughput_"))
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "student" / "config.json").exists():
        build_student(args, work / "student")
    write_dataset(args, work / "data.jsonl")
    modes = args.modes.split(",")
    runs = {mode: [] for mode in modes}
    for round_index in range(args.rounds):
        for mode in modes:
            measured = run_mode(args, work, mode)
            runs[mode].append(measured)
            print(f"round {round_index + 1} {mode:>13}: {measured['tokens'] / measured['seconds']:8.1f} tokens/s "
                  f"({measured['tokens']} tokens in {measured['seconds']:.1f} s, {measured['cpu_seconds']:.1f} "
                  "CPU-s)", flush=True)
    # Best round per mode: other jobs on a shared machine only ever slow a run down, so the fastest round is the
    # least disturbed measurement of each mode. tokens/CPU-s (best round too) is printed alongside.
    rate = {mode: max(run["tokens"] / run["seconds"] for run in measured) for mode, measured in runs.items()}
    cpu_rate = {mode: max(run["tokens"] / run["cpu_seconds"] for run in measured) for mode, measured in runs.items()}
    for mode in modes:
        print(f"{mode:>13}: {rate[mode]:8.1f} tokens/s  {cpu_rate[mode]:8.1f} tokens/CPU-s  (best of {args.rounds})")

    def ratio(a: str, b: str) -> str:
        return f"{rate[a] / rate[b]:.2f}" if a in rate and b in rate else "nan"

    print(f"padding-free vs padding: {ratio('ours_padfree', 'ours')}x")
    print(f"RESULT train_vs_limit={ratio('ours', 'torch')} train_vs_bare_trl={ratio('ours', 'trl')} "
          f"packing_gain={ratio('ours_packed', 'ours')}")


if __name__ == "__main__":
    main()
