"""generate --shard I/N: a deterministic split by prompt id, one ledger and manifest per shard, read whole by curate
and `run`. Against the stand-in teacher (stand_in.py): the split and the bookkeeping are under test, not the model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cot_distill.config import load_recipe
from cot_distill.curate import run_curate
from cot_distill.generate import GenerateError, run_generate
from cot_distill.generate.shards import ShardError, generate_parts, shard_of
from cot_distill.pipeline import PipelineError, run_generate_stage
from cot_distill.records import iter_jsonl, read_manifest

from conftest import run_cli, write_recipe
from stand_in import StandIn

ANSWER = "<think>adding</think> The answer is \\boxed{{{}}}."


@pytest.fixture
def stand_in():
    def right(prompt: str) -> str:  # conftest's prompts ask "What is i + (i+1)?"
        numbers = [int(word.strip("?")) for word in prompt.split() if word.strip("?").isdigit()]
        return ANSWER.format(sum(numbers[-2:]))

    server = StandIn(answer=right)
    yield server
    server.close()


def keys_in(folder) -> set[tuple[str, int, str]]:
    return {(s["prompt_id"], s["sample_idx"], s["request_key"]) for _, s in iter_jsonl(folder / "samples.jsonl")}


def test_two_shards_make_the_unsharded_job_and_curate_reads_both(tmp_path, prompts_file, stand_in):
    (tmp_path / "whole").mkdir()
    whole = write_recipe(tmp_path / "whole", [stand_in.base_url], prompts_file)
    sharded = write_recipe(tmp_path, [stand_in.base_url], prompts_file)
    run_generate(load_recipe(whole))
    overrides = [f"curate.output_dir={tmp_path / 'curated'}"]
    run_generate(load_recipe(sharded, ["generate.shard=0/2"]))
    with pytest.raises(ShardError, match=r"shards \[1\] of 2 have not been started"):
        run_curate(load_recipe(sharded, overrides))
    run_generate(load_recipe(sharded, ["generate.shard=1/2"]))

    out = tmp_path / "out"
    shard_keys = [keys_in(out / f"shard-{index}-of-2") for index in range(2)]
    assert shard_keys[0] and shard_keys[1] and not shard_keys[0] & shard_keys[1]
    assert shard_keys[0] | shard_keys[1] == keys_in(tmp_path / "whole" / "out")  # same requests, same keys
    assert all(shard_of(prompt_id, 2) == index for index in range(2) for prompt_id, _, _ in shard_keys[index])
    assert all(read_manifest(out / f"shard-{index}-of-2")["complete"] for index in range(2))

    report = run_curate(load_recipe(sharded, overrides))
    assert "2 shards" in report["input"]["samples_file"] and report["input"]["prompts_without_sample"] == 0
    rows = [row for _, row in iter_jsonl(tmp_path / "curated" / "train.jsonl")]
    assert {row["prompt_id"] for row in rows} == {f"p{index:02d}" for index in range(12)}  # from both shards


def test_curate_and_run_refuse_while_a_shard_is_unfinished(tmp_path, prompts_file, stand_in):
    recipe = write_recipe(tmp_path, [stand_in.base_url], prompts_file)
    for index in range(2):
        run_generate(load_recipe(recipe, [f"generate.shard={index}/2"]))
    (tmp_path / "out" / "shard-1-of-2" / "manifest.json").unlink()  # as if shard 1 were still running
    overrides = [f"curate.output_dir={tmp_path / 'curated'}"]
    with pytest.raises(Exception, match="shards shard-1-of-2 of .* have no manifest.json"):
        run_curate(load_recipe(recipe, overrides))
    with pytest.raises(PipelineError, match="shards shard-1-of-2 of .* are unfinished"):
        run_generate_stage(load_recipe(recipe))

    run_generate(load_recipe(recipe, ["generate.shard=1/2"]))  # the shard resumes on its own: nothing to send
    sent = len(stand_in.arrivals)
    run_generate_stage(load_recipe(recipe))  # complete shards: `run` uses them and generates nothing
    assert len(stand_in.arrivals) == sent == 36 and len(generate_parts(tmp_path / "out")) == 2


def test_an_unsharded_run_into_a_sharded_folder_is_refused(tmp_path, prompts_file, stand_in):
    recipe = write_recipe(tmp_path, [stand_in.base_url], prompts_file)
    run_generate(load_recipe(recipe, ["generate.shard=0/3"]))
    with pytest.raises(GenerateError, match="holds shard folders"):
        run_generate(load_recipe(recipe))


@pytest.mark.parametrize("shard", ["2/2", "1", "-1/2", "a/b"])
def test_a_bad_shard_is_a_clear_error(tmp_path, prompts_file, shard):
    recipe = write_recipe(tmp_path, ["http://unused/v1"], prompts_file)
    result = run_cli("generate", str(recipe), "--shard", shard)
    assert result.returncode == 2 and "shard must be I/N with 0 <= I < N" in result.stderr
    assert not (tmp_path / "out").exists()


def test_the_split_is_the_same_in_every_process():
    """Nodes of a job array must agree on the split: sha256 of the id, not Python's per-process hash()."""
    ids = [f"problem-{index}" for index in range(1000)]
    counts = [sum(shard_of(prompt_id, 4) == shard for prompt_id in ids) for shard in range(4)]
    assert all(200 <= count <= 300 for count in counts)  # about a quarter each
    code = ("from cot_distill.generate.shards import shard_of; "
            "print([shard_of(f'problem-{i}', 4) for i in range(1000)])")
    for seed in ("1", "2"):
        result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed},
                                capture_output=True, text=True, check=True)
        assert json.loads(result.stdout) == [shard_of(prompt_id, 4) for prompt_id in ids]
