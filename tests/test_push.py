"""`cot-distill push` against a recording stand-in for the hub: there is no hub here. The finished stage folders are
built by hand (manifests, a two-row curated dataset written by curate's own save_dataset, a report.json written by
the pipeline's own write_report over hand-made eval folders, model folders with a dummy safetensors file), then:
which repos are created, which files go up (never checkpoints), the private flag and the token, the cards' numbers
and provenance, refusals of unfinished folders, the dry run, the CLI."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml
from huggingface_hub import DatasetCard, ModelCard
from huggingface_hub.utils import filter_repo_objects
from typer.testing import CliRunner

from cot_distill import push
from cot_distill.cli import app
from cot_distill.config import Recipe, recipe_snapshot
from cot_distill.config.push import PushSection
from cot_distill.curate.report import FilterTally, RunRecord, build_report, save_dataset
from cot_distill.pipeline import StageClock, write_report
from cot_distill.records import JsonlWriter, read_json, write_json_atomic, write_manifest

SECRET = "hf_TestTokenThatMustNeverBeWritten0123"
STUDENT = "HuggingFaceTB/SmolLM2-135M-Instruct"
TRAINING_STATE = ["checkpoint-10/model.safetensors", "checkpoint-10/optimizer.pt", "checkpoint-10/trainer_state.json",
                  "stale-checkpoints/checkpoint-5/optimizer.pt", "student_init/model.safetensors"]
MODEL_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "train_config.resolved.json"]


# ------------------------------------------------------------------------------------------ finished stages

def recipe_doc(tmp_path: Path, **push_changes) -> dict:
    return {
        "name": "tiny-distill",
        "teacher": {"backend": "openai", "model": "teacher-7b", "base_urls": ["http://127.0.0.1:9/v1"]},
        "data": {"prompts": str(tmp_path / "prompts.jsonl")},
        "generate": {"output_dir": str(tmp_path / "generate")},
        "curate": {"output_dir": str(tmp_path / "curate")},
        "train": {"student": STUDENT, "output_dir": str(tmp_path / "train"), "sft": {"learning_rate": 1.0e-4}},
        "ablations": {"lr": {"output_dir": str(tmp_path / "train-lr"), "sft": {"learning_rate": 3.0e-4}}},
        "eval": {"output_dir": str(tmp_path / "eval")},
        "report": str(tmp_path / "report.json"),
        "push": {"dataset_repo": "me/tiny-traces", "student_repo": "me/tiny-student",
                 "ablation_repos": {"lr": "me/tiny-student-lr"}, "token_env": "TEST_HUB_TOKEN",
                 "output_dir": str(tmp_path / "push"), **push_changes},
    }


def training_row(index: int) -> dict:
    return {"messages": [{"role": "user", "content": f"What is {index} + 1?"},
                         {"role": "assistant", "content": f"<think>add one</think>{index + 1}"}],
            "reasoning": "add one", "answer_text": str(index + 1), "prompt_id": f"p{index}", "source": "arith",
            "teacher": "teacher-7b", "grade": {"extracted": str(index + 1), "route": "number"}, "tokens": 12,
            "sample_idx": 0}


def finish_generate(recipe: Recipe) -> None:
    folder = Path(recipe.generate.output_dir)
    folder.mkdir(parents=True)
    write_manifest(folder, stage="generate", recipe=recipe_snapshot(recipe), counts={"samples": 3}, files=[],
                   extra={"teacher_identity": {"root": "/models/teacher-7b", "max_model_len": 4096}})


def finish_curate(recipe: Recipe) -> dict:
    folder = Path(recipe.curate.output_dir)
    folder.mkdir(parents=True)
    with JsonlWriter(folder / "train.jsonl") as writer:
        for index in range(2):
            writer.write(training_row(index))
    dataset_files = save_dataset(folder / "train.jsonl", folder / "dataset", "think_tags")
    run = RunRecord(tallies=[FilterTally("input", seen=3, kept=3),
                             FilterTally("correctness", seen=3, kept=2, dropped=Counter({"wrong_answer": 1}))])
    run.lines_read = 3
    report = build_report(run, config=recipe.curate.model_dump(mode="json"),
                          inputs={"prompts": 2, "prompts_without_sample": 0, "generate_failed_permanently": 0},
                          seconds=1.0)
    report["output"] = {"rows": 2, "prompts": 2, "tokens": {"total": 24, "mean": 12.0, "p50": 12, "p90": 12,
                                                             "max": 12}}
    write_json_atomic(folder / "report.json", report)
    return write_manifest(folder, stage="curate", recipe=recipe_snapshot(recipe),
                          counts={"samples_in": 3, "rows": 2, "prompts": 2},
                          files=["train.jsonl", "report.json", *dataset_files])


def finish_train(folder: Path, recipe: Recipe, train_loss: float) -> None:
    """A train output as train/run.py leaves it: the model, checkpoints beside it, manifest.json last listing the
    model files (and training_args.bin, which train lists too)."""
    for name in [*MODEL_FILES, *TRAINING_STATE, "training_args.bin"]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"{}" if name.endswith(".json") else b"\0" * 16)
    write_manifest(folder, stage="train", recipe=recipe_snapshot(recipe), files=[*MODEL_FILES, "training_args.bin"],
                   counts={"examples": 2, "trained_examples": 2, "global_step": 4},
                   extra={"model_dir": str(folder), "adapter": False, "student": STUDENT, "train_loss": train_loss})
    (folder / ".pipeline-fingerprint").write_text("abc")  # `cot-distill run` writes it after the manifest


def benchmark(pass_at_1: float, stderr: float, tokens: float) -> dict:
    return {"problems": 50, "samples_per_problem": 4, "samples": 200, "pass_at_1": pass_at_1,
            "pass_at_1_stderr": stderr, "pass_at_k": {"1": pass_at_1, "4": min(1.0, pass_at_1 + 0.2)},
            "maj_at_k": pass_at_1, "truncation_rate": 0.05, "mean_completion_tokens": tokens,
            "latency_s": {"p50": 1.0, "p95": 2.0}, "throughput_tokens_per_s": 100.0}


def finish_eval_and_report(recipe: Recipe, monkeypatch) -> dict:
    """report.json as `cot-distill run` writes it: eval folders, compare, then the pipeline's write_report."""
    from cot_distill.evaluate import run_compare

    monkeypatch.setattr("cot_distill.evaluate.compare.plot_comparison", lambda rows, path: None)  # no PNG needed
    scores = {"teacher": (0.8, 0.04, 900.0), "student_after": (0.6, 0.03, 700.0), "student_lr": (0.5, 0.05, 650.0)}
    folders = {}
    for label, (pass_at_1, stderr, tokens) in scores.items():
        folder = Path(recipe.eval.output_dir) / label
        write_json_atomic(folder / "results.json", {
            "model": {"name": label, "parameters": 135_000_000, "layers": 30, "path": str(folder),
                      "size_on_disk_bytes": 270_000_000, "peak_memory": {"available": False}},
            "generation": {}, "benchmarks": {"gsm8k": benchmark(pass_at_1, stderr, tokens)}})
        write_manifest(folder, stage="eval", recipe={}, counts={}, files=["results.json"])
        folders[label] = folder
    compare_dir = Path(recipe.eval.output_dir) / "compare"
    comparison = run_compare(list(folders.values()), compare_dir, folders["teacher"])
    return read_json(write_report(recipe, folders, compare_dir, StageClock(), comparison))


@pytest.fixture
def finished(tmp_path, monkeypatch):
    """A recipe whose generate, curate, train (student and ablation) and eval stages have all finished."""
    recipe = Recipe.model_validate(recipe_doc(tmp_path))
    finish_generate(recipe)
    finish_curate(recipe)
    finish_train(Path(recipe.train.output_dir), recipe, 0.4321)
    finish_train(Path(recipe.ablation_train("lr").output_dir),
                 recipe.model_copy(update={"train": recipe.ablation_train("lr")}), 0.5)
    finish_eval_and_report(recipe, monkeypatch)
    monkeypatch.setenv("TEST_HUB_TOKEN", SECRET)
    return recipe


class RecordingHub:
    """A stand-in for HfApi: records every call; upload_folder resolves its patterns the way HfApi does."""

    def __init__(self, log: list | None = None):
        self.log = [] if log is None else log
        self.uploaded: dict[str, list[str]] = {}
        self.cards: dict[str, str] = {}

    def create_repo(self, repo_id, **kwargs):
        self.log.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        self.log.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, *, folder_path, repo_id, allow_patterns=None, ignore_patterns=None, **kwargs):
        self.log.append(("upload_folder", repo_id, kwargs))
        folder = Path(folder_path)
        on_disk = sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())
        self.uploaded[repo_id] = list(filter_repo_objects(on_disk, allow_patterns=allow_patterns,
                                                          ignore_patterns=ignore_patterns))

    def upload_file(self, *, path_or_fileobj, path_in_repo, repo_id, **kwargs):
        self.log.append(("upload_file", repo_id, {"path_in_repo": path_in_repo, **kwargs}))
        self.cards[repo_id] = path_or_fileobj.decode("utf-8")


@pytest.fixture
def dataset_pushes(monkeypatch):
    """Dataset.push_to_hub replaced by a recorder: (rows, columns, repo_id, its keyword arguments) per call."""
    import datasets

    calls: list = []

    def fake_push_to_hub(self, repo_id, **kwargs):
        calls.append((len(self), self.column_names, repo_id, kwargs))

    monkeypatch.setattr(datasets.Dataset, "push_to_hub", fake_push_to_hub)
    return calls


# --------------------------------------------------------------------------------------------------- uploads

def test_push_creates_private_repos_and_uploads_only_the_final_models(finished, dataset_pushes, monkeypatch):
    hub = RecordingHub()
    made_with: list[str] = []
    monkeypatch.setattr(push, "hub_client", lambda token: made_with.append(token) or hub)

    plan = push.run_push(finished)

    assert made_with == [SECRET]  # the token comes from push.token_env, once, into the one client
    created = [(repo, kwargs) for call, repo, kwargs in hub.log if call == "create_repo"]
    assert created == [("me/tiny-traces", {"repo_type": "dataset", "private": True, "exist_ok": True}),
                       ("me/tiny-student", {"repo_type": "model", "private": True, "exist_ok": True}),
                       ("me/tiny-student-lr", {"repo_type": "model", "private": True, "exist_ok": True})]
    # exactly the model files: no checkpoint-*/, stale-checkpoints/, student_init/, training_args.bin, manifest
    assert hub.uploaded == {"me/tiny-student": MODEL_FILES, "me/tiny-student-lr": MODEL_FILES}
    assert sorted(hub.cards) == ["me/tiny-student", "me/tiny-student-lr", "me/tiny-traces"]
    assert all(kwargs["path_in_repo"] == "README.md" for call, _, kwargs in hub.log if call == "upload_file")
    assert dataset_pushes == [(2, list(training_row(0)), "me/tiny-traces",
                               {"private": True, "token": SECRET, "revision": None,
                                "commit_message": "cot-distill push: tiny-distill"})]
    assert [upload["label"] for upload in plan["uploads"]] == ["dataset", "student_after", "student_lr"]
    written = [path.read_text() for path in Path(finished.push.output_dir).rglob("*") if path.is_file()]
    assert written and not any(SECRET in text for text in [*written, *hub.cards.values()])


def test_the_one_hub_client_carries_the_token():
    from huggingface_hub import HfApi

    client = push.hub_client(SECRET)  # makes no request
    assert isinstance(client, HfApi) and client.token == SECRET


def test_the_dataset_card_goes_up_before_the_rows_so_push_to_hub_keeps_it(finished, monkeypatch):
    import datasets

    log: list = []
    monkeypatch.setattr(datasets.Dataset, "push_to_hub", lambda self, repo_id, **kw: log.append(("rows", repo_id)))
    push.run_push(finished.model_copy(update={"push": finished.push.model_copy(
        update={"student_repo": None, "ablation_repos": {}})}), client=RecordingHub(log))
    assert [entry[:2] for entry in log] == [("create_repo", "me/tiny-traces"), ("upload_file", "me/tiny-traces"),
                                            ("rows", "me/tiny-traces")]


def test_public_push_to_a_branch_creates_it(finished, dataset_pushes):
    recipe = finished.model_copy(update={"push": finished.push.model_copy(
        update={"private": False, "revision": "v1", "dataset_repo": None, "ablation_repos": {}})})
    hub = RecordingHub()
    push.run_push(recipe, client=hub)
    assert [(call, kwargs) for call, _, kwargs in hub.log][:2] == [
        ("create_repo", {"repo_type": "model", "private": False, "exist_ok": True}),
        ("create_branch", {"branch": "v1", "repo_type": "model", "exist_ok": True})]
    assert all(kwargs["revision"] == "v1" for call, _, kwargs in hub.log if call.startswith("upload"))
    assert dataset_pushes == []


def test_a_missing_token_stops_before_anything(finished, monkeypatch):
    monkeypatch.delenv("TEST_HUB_TOKEN")
    hub = RecordingHub()
    with pytest.raises(push.PushError, match="TEST_HUB_TOKEN"):
        push.run_push(finished, client=hub)
    assert hub.log == [] and not Path(finished.push.output_dir).exists()


# ------------------------------------------------------------------------------------------------------ cards

def test_the_student_card_has_its_eval_numbers_and_provenance(finished):
    curate_manifest = read_json(Path(finished.curate.output_dir) / "manifest.json")
    cards = {upload.label: upload.card for upload in push.plan_push(finished)}

    card = cards["student_after"]
    assert ModelCard(card).data.base_model == STUDENT
    assert ModelCard(card).data.datasets == ["me/tiny-traces"]
    assert "| gsm8k | 60.0% ± 3.0 | 80.0% (k=4) | 75.0% ±" in card  # pass@1 ± stderr, best pass@k, retention
    assert "| 700 | 80.0% | 50 x 4 |" in card  # tokens per answer, the teacher's pass@1, problems x samples
    report = read_json(finished.report_path())
    assert report["retention_se_method"] == "delta_method"  # no graded.jsonl in these eval folders
    assert f"Retention (pass@1 / the teacher's): {100 * report['retention']:.1f}% ± " \
           f"{100 * report['retention_se']:.1f} (delta method)" in card
    assert "[me/tiny-traces](https://huggingface.co/datasets/me/tiny-traces)" in card
    assert curate_manifest["files"]["train.jsonl"] in card
    assert "2 rows for 2 prompts, curated from 3 teacher samples" in card
    assert "2 examples for 4 steps\n- final train loss 0.4321" in card and "Not quantized" in card
    assert "teacher weights: max_model_len=`4096`, root=`/models/teacher-7b`" in card
    assert "learning_rate: 0.0001" in card and "output_dir" not in card  # the config, without local paths

    ablation = cards["student_lr"]
    assert "| gsm8k | 50.0% ± 5.0 | 70.0% (k=4) | 62.5% ±" in ablation
    assert "learning_rate: 0.0003" in ablation and "Retention (pass@1" not in ablation


def test_the_dataset_card_has_the_teacher_counts_filters_and_config(finished):
    card = next(upload.card for upload in push.plan_push(finished) if upload.label == "dataset")
    data = DatasetCard(card).data
    assert data.pretty_name == "tiny-distill: curated chain-of-thought traces" and data.size_categories == ["n<1K"]
    assert "`teacher-7b` (backend `openai`)" in card
    assert "max_model_len=`4096`, root=`/models/teacher-7b`" in card  # generate's teacher identity
    assert "| teacher samples read | 3 |" in card and "| rows | 2 |" in card
    assert "| correctness | 3 | 2 | wrong_answer 1 |" in card
    assert "near_dup:" in card and "threshold: 0.9" in card  # the curate config snapshot
    assert 'datasets.load_dataset("me/tiny-traces")' in card


def test_eval_numbers_older_than_the_weights_are_not_shown(finished):
    manifest_path = Path(finished.train.output_dir) / "manifest.json"
    manifest = read_json(manifest_path)
    write_json_atomic(manifest_path, {**manifest, "finished_at": "2999-01-01T00:00:00+00:00"})
    card = next(upload.card for upload in push.plan_push(finished) if upload.label == "student_after")
    assert "predates these weights" in card and "60.0%" not in card


def test_without_a_report_the_card_says_the_model_was_not_evaluated(finished):
    finished.report_path().unlink()
    card = next(upload.card for upload in push.plan_push(finished) if upload.label == "student_after")
    assert "Not evaluated" in card and "| gsm8k |" not in card


def test_the_quantized_student_names_its_scheme_and_source(finished, dataset_pushes):
    quantized = Path(f"{finished.train.output_dir}-quantized")
    quantized.mkdir()
    (quantized / "config.json").write_text("{}")
    (quantized / "model.safetensors").write_bytes(b"\0" * 8)
    write_manifest(quantized, stage="quantize", recipe={}, counts={}, files=["config.json", "model.safetensors"],
                   extra={"quantization": {"scheme": "w4a16-awq", "group_size": 128}})
    recipe = finished.model_copy(update={"push": finished.push.model_copy(update={"quantized_repo": "me/tiny-q4"})})
    hub = RecordingHub()
    push.run_push(recipe, client=hub)
    card = hub.cards["me/tiny-q4"]
    assert hub.uploaded["me/tiny-q4"] == ["config.json", "model.safetensors"]
    assert ModelCard(card).data.base_model == "me/tiny-student"
    assert "Scheme: `w4a16-awq` of [me/tiny-student]" in card and "group_size: 128" in card
    assert "Not quantized" in hub.cards["me/tiny-student"]


def test_a_quantized_repo_without_its_folder_is_skipped(finished, dataset_pushes):
    recipe = finished.model_copy(update={"push": finished.push.model_copy(update={"quantized_repo": "me/tiny-q4"})})
    assert [upload.label for upload in push.plan_push(recipe)] == ["dataset", "student_after", "student_lr"]


def test_a_merged_lora_student_uploads_its_merged_folder(tmp_path):
    from cot_distill.config import TrainSection

    train = TrainSection(student=STUDENT, output_dir=str(tmp_path / "train"), lora={}, merge=True)
    folder, prefix = push.student_folder(train)
    for name in ["adapter_model.safetensors", "merged/model.safetensors", "merged/config.json"]:
        (tmp_path / "train" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "train" / name).write_bytes(b"\0")
    manifest = {"files": {name: "" for name in ["adapter_model.safetensors", "merged/model.safetensors",
                                                "merged/config.json"]}}
    assert folder == tmp_path / "train" / "merged"
    assert push.listed_files(folder, manifest, prefix, "cot-distill train") == ["config.json", "model.safetensors"]


def test_training_state_never_uploads_even_when_a_manifest_lists_it(tmp_path):
    listed = ["model.safetensors", "checkpoint-4/optimizer.pt", "stale-checkpoints/checkpoint-2/model.safetensors",
              "student_init/model.safetensors", "training_args.bin", "README.md", ".pipeline-fingerprint"]
    for name in listed:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"\0")
    files = push.listed_files(tmp_path, {"files": dict.fromkeys(listed, "")}, "", "cot-distill train")
    assert files == ["model.safetensors"]


# -------------------------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("stage_dir, command", [("train", "cot-distill train"), ("train-lr", "cot-distill train"),
                                                ("curate", "cot-distill curate")])
def test_an_unfinished_folder_refuses_the_whole_push(finished, stage_dir, command, dataset_pushes):
    folder = Path(finished.push.output_dir).parent / stage_dir
    (folder / "manifest.json").unlink()
    hub = RecordingHub()
    with pytest.raises(push.PushError) as refused:
        push.run_push(finished, client=hub)
    assert str(folder) in str(refused.value) and f"`{command}`" in str(refused.value)
    assert hub.log == [] and dataset_pushes == [] and not Path(finished.push.output_dir).exists()


def test_a_file_the_manifest_lists_must_still_be_there(finished):
    (Path(finished.train.output_dir) / "model.safetensors").unlink()
    with pytest.raises(push.PushError, match="model.safetensors is listed in the manifest but missing"):
        push.plan_push(finished)


def test_a_half_written_quantized_folder_is_refused(finished):
    Path(f"{finished.train.output_dir}-quantized").mkdir()
    recipe = finished.model_copy(update={"push": finished.push.model_copy(update={"quantized_repo": "me/tiny-q4"})})
    with pytest.raises(push.PushError, match="-quantized has no manifest.json"):
        push.plan_push(recipe)


def test_push_settings_that_cannot_work_are_refused(finished):
    with pytest.raises(push.PushError, match="no ablation 'kd'"):
        push.plan_push(finished.model_copy(update={"push": PushSection(ablation_repos={"kd": "me/kd"})}))
    with pytest.raises(push.PushError, match="nothing to push"):
        push.plan_push(finished.model_copy(update={"push": PushSection()}))
    with pytest.raises(push.PushError, match="same repo"):
        push.plan_push(finished.model_copy(update={"push": PushSection(student_repo="me/a",
                                                                       ablation_repos={"lr": "me/a"})}))
    with pytest.raises(ValueError, match="not the token"):
        PushSection(token_env=SECRET)
    with pytest.raises(ValueError, match="not a hub repo id"):
        PushSection(student_repo="me/../x")


# --------------------------------------------------------------------------------------------- dry run, CLI

class NoHub:
    def __getattr__(self, name):
        raise AssertionError(f"a dry run called the hub: {name}")


def test_a_dry_run_writes_the_cards_and_plan_and_calls_no_hub(finished, dataset_pushes, monkeypatch):
    monkeypatch.delenv("TEST_HUB_TOKEN")  # a dry run needs no token
    recipe = finished.model_copy(update={"push": finished.push.model_copy(update={"dry_run": True})})
    push.run_push(recipe, client=NoHub())
    out = Path(recipe.push.output_dir)
    plan = read_json(out / "plan.json")
    assert plan["dry_run"] is True and dataset_pushes == []
    assert {upload["repo_id"]: upload["files"] for upload in plan["uploads"]}["me/tiny-student"] == MODEL_FILES
    assert "60.0% ± 3.0" in (out / "student_after" / "README.md").read_text()
    assert "wrong_answer 1" in (out / "dataset" / "README.md").read_text()
    assert read_json(out / "manifest.json")["dry_run"] is True


def test_cli_push_help_names_the_options():
    result = CliRunner().invoke(app, ["push", "--help"])
    assert result.exit_code == 0
    assert "--dry-run" in result.output and "--set" in result.output and "HF_TOKEN" in result.output


def test_cli_push_dry_run_and_a_clean_refusal(finished, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(json.loads(finished.model_dump_json())))
    result = CliRunner().invoke(app, ["push", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "would push student_after: 5 files -> https://huggingface.co/me/tiny-student" in result.output

    (Path(finished.train.output_dir) / "manifest.json").unlink()
    result = CliRunner().invoke(app, ["push", str(path), "--dry-run"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.startswith(f"error: {finished.train.output_dir} has no manifest.json")
