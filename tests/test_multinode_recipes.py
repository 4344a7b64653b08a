"""The multi-node recipes (recipes/multinode/*.sbatch, recipes/accelerate/zero3-multinode.yaml,
recipes/r1-distill-multinode.yaml), checked as far as a CPU machine without Slurm can: each script is valid bash,
every `vllm serve` line parses with vLLM's own serve parser, every `accelerate launch` line with accelerate's, every
`cot-distill` line names a real command and options, and the files they point at exist and load.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from conftest import REPO_ROOT

SCRIPTS = sorted((REPO_ROOT / "recipes" / "multinode").glob("*.sbatch"))
PLACEHOLDERS = {"$TEACHER": "org/model", "$HEAD": "node0", "$SLURM_NODEID": "0", "$SHARD": "0", "$SHARDS": "8",
                "$SERVER": "1"}


def commands(script: Path, program: str) -> list[list[str]]:
    """The argument lists of every `program ...` command in the script: continuation lines joined, variables
    replaced by sample values, the program's own name dropped."""
    text = script.read_text().replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        # The last line of a `bash -c '...'` block ends with the block's closing quote.
        line = line.split(" #")[0].strip().removeprefix("exec ").rstrip("'&").strip()
        if not line.startswith(program + " "):
            continue
        for name, value in sorted(PLACEHOLDERS.items(), key=lambda item: -len(item[0])):  # $SHARDS before $SHARD
            line = line.replace(f'"{name}"', value).replace(name, value)
        found.append(shlex.split(line)[len(program.split()):])
    return found


def test_there_are_multinode_recipes():
    assert {script.name for script in SCRIPTS} >= {"generate-shards.sbatch", "vllm-dp-teacher.sbatch",
                                                   "train.sbatch"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_each_script_is_valid_bash_and_asks_slurm_for_nodes(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert re.search(r"^#SBATCH --nodes=\d+", script.read_text(), re.M)
    for path in re.findall(r"recipes/[\w./-]+\.ya?ml", script.read_text()):
        assert (REPO_ROOT / path).is_file(), f"{script.name} names {path}, which does not exist"


def test_every_vllm_serve_line_parses_with_vllms_own_parser():
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    lines = [args for script in SCRIPTS for args in commands(script, "vllm serve")]
    assert len(lines) >= 3  # one per node in the shards job, head and headless in the data-parallel job
    for args in lines:
        parsed = make_arg_parser(FlexibleArgumentParser()).parse_args(args)
        assert parsed.model_tag == "org/model"
    headless = [args for args in lines if "--headless" in args]
    assert headless and all("--data-parallel-start-rank" in args for args in headless)


def test_the_accelerate_launch_line_parses_and_its_config_is_two_machines():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    (args,) = [args for script in SCRIPTS for args in commands(script, "accelerate launch")]
    parsed = launch_command_parser().parse_args(args)
    assert (parsed.num_machines, parsed.num_processes, parsed.machine_rank) == (2, 16, 0)
    assert parsed.module and parsed.training_script == "cot_distill.train"
    config = load_config_from_file(str(REPO_ROOT / parsed.config_file))
    assert config.num_machines == 2 and config.num_processes == 16 and config.distributed_type == "DEEPSPEED"


def test_every_cot_distill_line_is_a_real_command_on_a_recipe_that_loads():
    from typer.testing import CliRunner

    from cot_distill.cli import app
    from cot_distill.config import load_recipe

    lines = [args for script in SCRIPTS for args in commands(script, "cot-distill")]
    assert lines
    for args in lines:
        help_text = CliRunner().invoke(app, [args[0], "--help"]).output
        for option in (arg for arg in args if arg.startswith("--")):
            assert option in help_text, f"cot-distill {args[0]} has no option {option}"
        recipe = load_recipe(REPO_ROOT / args[1], [f"generate.shard={args[args.index('--shard') + 1]}"]
                             if "--shard" in args else [])
        assert recipe.teacher.base_urls == ["http://127.0.0.1:8000/v1"]  # the node's own server
