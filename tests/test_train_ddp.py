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



def test_a_process_that_trained_leaves_its_process_group_at_exit(tmp_path):
    """A gloo group left to the interpreter's teardown can abort a rank that finished training (a CI run failed so):
    run_train registers leave_process_group with atexit. Checked by an exit handler registered before it, which
    atexit runs after it."""
    script = f"""
import atexit
import torch.distributed
atexit.register(lambda: print("group at exit:", torch.distributed.is_initialized(), flush=True))
from cot_distill.train.run import leave_process_group_at_exit
leave_process_group_at_exit()
leave_process_group_at_exit()  # once per process
store = torch.distributed.FileStore({str(tmp_path / "store")!r}, 1)
torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
print("group in training:", torch.distributed.is_initialized(), flush=True)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["group in training: True", "group at exit: False"], done.stdout
