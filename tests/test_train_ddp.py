"""`accelerate launch` with 2 CPU processes (DDP over gloo) runs the same entry point unchanged."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from test_train_support import make_tiny_student, write_toy_dataset  # noqa: E402

from cot_distill.records import read_manifest  # noqa: E402
from cot_distill.teachers.serve import free_port  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def test_two_cpu_processes_train_and_write_one_checkpoint(tmp_path):
    student = make_tiny_student(tmp_path / "student")
    data = write_toy_dataset(tmp_path / "data.jsonl", copies=8)  # 16 rows = 4 steps of 2 ranks x 2 rows
    section = {"student": str(student), "dataset": str(data), "output_dir": str(tmp_path / "out"),
               "sft": {"max_steps": 4, "per_device_train_batch_size": 2, "save_strategy": "steps", "save_steps": 4,
                       "logging_steps": 1, "learning_rate": 1e-3, "seed": 0, "max_length": 128}}
    config_file = tmp_path / "train.yaml"
    config_file.write_text(yaml.safe_dump(section))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "recipes" / "accelerate" / "ddp.yaml"), "--num_processes", "2",  # no GPU here: gloo
               "--main_process_port", str(free_port()), "-m", "cot_distill.train", str(config_file)]
    # CPU only, even on a GPU machine: the point is the multi-process path, over gloo.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, timeout=420, cwd=REPO, env=env)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]

    # Searched anywhere, not at line starts: the two ranks share one pipe, so a line can follow a partial one.
    finished = sorted(re.findall(r"cot_distill\.train: rank (\d+) done", log))
    assert finished == ["0", "1"], log[-2000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    manifest = read_manifest(out)
    assert manifest["world_size"] == 2 and manifest["counts"]["global_step"] == 4
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["epoch"] == 1.0  # 2 ranks x 2 rows x 4 steps = all 16 rows once


FINISH_A_RANK = """
import atexit, sys
import torch, torch.distributed
from cot_distill.train import finish_rank
atexit.register(lambda: print("interpreter teardown", flush=True))
torch.distributed.init_process_group("gloo", store=torch.distributed.FileStore(sys.argv[1], 1), rank=0, world_size=1)
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
model(torch.randn(2, 4)).sum().backward()
print("trained", end="")  # unflushed: finish_rank flushes it
finish_rank()
print(" and returned")
"""


def test_a_rank_that_trained_exits_without_the_interpreters_teardown(tmp_path, monkeypatch):
    """Once DDP wraps a model, gloo's threads outlive destroy_process_group, and the interpreter's teardown can then
    abort a rank that finished training (a CI run failed so): finish_rank leaves the group, flushes and exits at
    once. A process that is no rank of a launch (WORLD_SIZE unset or 1) returns and tears down as usual."""
    from cot_distill.train import finish_rank

    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "WORLD_SIZE": "2"}
    done = subprocess.run([sys.executable, "-c", FINISH_A_RANK, str(tmp_path / "store")], capture_output=True,
                          text=True, timeout=120, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["trained"], done.stdout
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    finish_rank()  # returns
    monkeypatch.setenv("WORLD_SIZE", "1")
    finish_rank()  # returns
