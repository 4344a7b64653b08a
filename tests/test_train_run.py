"""run_train end to end on tiny students: learning to stop, saved artifacts, LoRA + merge, resume, loss paths."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_train_support import make_tiny_student, toy_conversation, write_toy_dataset  # noqa: E402

from cot_distill.config.train import TrainSection  # noqa: E402
from cot_distill.records import read_manifest  # noqa: E402
from cot_distill.train import run_train  # noqa: E402

QUICK = dict(per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, save_strategy="no", seed=0,
             max_length=128)
# The allocator tuning is process-wide; keep it out of the shared pytest process (the DDP test runs it).
IN_PROCESS = dict(tune_cpu_allocator=False)


def greedy_reply(model_dir: Path, question: str, max_new_tokens: int = 60) -> tuple[list[int], str, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**prompt, do_sample=False, max_new_tokens=max_new_tokens)
    new_tokens = output[0, prompt["input_ids"].shape[1]:].tolist()
    return new_tokens, tokenizer.decode(new_tokens), tokenizer


def test_student_learns_to_stop_and_is_saved_for_inference(tmp_path):
    student = make_tiny_student(tmp_path / "student", dtype="bfloat16")  # like most released students
    data = write_toy_dataset(tmp_path / "data.jsonl", copies=8)
    cfg = TrainSection(student=str(student), dataset=str(data), output_dir=str(tmp_path / "out"),
                       sft={**QUICK, "per_device_train_batch_size": 8, "learning_rate": 5e-3, "max_steps": 40,
                            "lr_scheduler_type": "constant", "logging_steps": 10}, **IN_PROCESS)
    out = run_train(cfg, {"train": cfg.model_dump()})

    manifest = read_manifest(out)
    assert manifest["complete"] and manifest["counts"]["global_step"] == 40
    # what the run cost: seconds per step from transformers' own timing, and the process's peak memory
    assert manifest["seconds_per_step"] * 40 == pytest.approx(manifest["train_runtime_s"], rel=0.05)
    assert manifest["seconds_per_step"] > 0 and manifest["peak_rss_gb"] > 0.1
    assert manifest["end_of_turn_token"] == "<|im_end|>" and manifest["model_dir"] == str(out)
    assert "model.safetensors" in manifest["files"] and "generation_config.json" in manifest["files"]
    written_before = max(p.stat().st_mtime for p in out.iterdir() if p.is_file() and p.name != "manifest.json")
    assert (out / "manifest.json").stat().st_mtime >= written_before

    new_tokens, text, tokenizer = greedy_reply(out, "What is 3+4?")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert new_tokens[-1] == im_end, text  # stopped by itself, well before max_new_tokens
    assert text == toy_conversation(3, 4)[1]["content"] + "<|im_end|>"
    generation_config = json.loads((out / "generation_config.json").read_text())
    eos = generation_config["eos_token_id"]
    assert im_end in (eos if isinstance(eos, list) else [eos])
    assert generation_config["pad_token_id"] == tokenizer.pad_token_id is not None
    assert tokenizer.chat_template is not None and "<|im_start|>" in tokenizer.chat_template
    # trained on float32 master weights, saved in the student's own bf16 (what vLLM will serve)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_lora_saves_an_adapter_and_merges_into_a_plain_model(tmp_path):
    from datasets import Dataset
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    student = make_tiny_student(tmp_path / "student")
    rows = [{"messages": [{"role": "user", "content": "What is 3+4?"},
                          {"role": "assistant", "content": "The answer is \\boxed{7}", "reasoning_content": "add"}],
             "prompt_id": str(i)} for i in range(8)]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "curated"))  # the curate stage's output format
    cfg = TrainSection(student=str(student), dataset=str(tmp_path / "curated"), output_dir=str(tmp_path / "out"),
                       sft={**QUICK, "max_steps": 3, "learning_rate": 1e-2}, lora={"r": 8, "alpha": 16},
                       merge=True, **IN_PROCESS)
    out = run_train(cfg, {})

    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert not (out / "model.safetensors").exists()  # full weights only in the merged folder
    manifest = read_manifest(out)
    assert manifest["adapter"] and manifest["model_dir"] == str(out / "merged")
    assert "merged/model.safetensors" in manifest["files"]

    input_ids = torch.tensor([[1, 5, 9, 30, 2, 7]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()  # plain transformers, no peft
        with_adapter = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
        base = AutoModelForCausalLM.from_pretrained(student).eval()
        merged_logits = merged(input_ids).logits
        assert torch.allclose(merged_logits, with_adapter(input_ids).logits, atol=1e-4)
        assert not torch.allclose(merged_logits, base(input_ids).logits, atol=1e-4)  # the adapter trained
    assert (out / "merged" / "tokenizer_config.json").exists()
    assert (out / "merged" / "generation_config.json").exists()


class Interrupt(RuntimeError):
    pass


def make_callbacks():
    from transformers import TrainerCallback

    class InterruptAfter(TrainerCallback):
        def __init__(self, step: int):
            self.step = step

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == self.step:
                raise Interrupt(f"simulated crash after step {self.step}")

    class FirstStep(TrainerCallback):
        first_step = None

        def on_step_end(self, args, state, control, **kwargs):
            if self.first_step is None:
                self.first_step = state.global_step

    return InterruptAfter, FirstStep


def test_resume_continues_from_the_last_complete_checkpoint(tmp_path):
    InterruptAfter, FirstStep = make_callbacks()
    teacher = make_tiny_student(tmp_path / "teacher", layers=3)
    data = write_toy_dataset(tmp_path / "data.jsonl", copies=6)
    cfg = TrainSection(init_from={"model": str(teacher), "keep_layers": [0, 2]}, dataset=str(data),
                       output_dir=str(tmp_path / "out"),
                       sft={**QUICK, "max_steps": 6, "save_strategy": "steps", "save_steps": 2}, **IN_PROCESS)
    with pytest.raises(Interrupt):
        run_train(cfg, {}, callbacks=[InterruptAfter(3)])
    out = Path(cfg.output_dir)
    assert (out / "checkpoint-2" / "trainer_state.json").exists() and not (out / "manifest.json").exists()
    (out / "checkpoint-4").mkdir()  # a checkpoint torn by a crash mid-save: no trainer_state.json

    first = FirstStep()
    run_train(cfg, {}, callbacks=[first])
    manifest = read_manifest(out)
    assert manifest["resumed_from"].endswith("checkpoint-2")
    assert first.first_step == 3  # continued at step 3, not from scratch
    assert manifest["counts"]["global_step"] == 6 and (out / "checkpoint-6" / "trainer_state.json").exists()
    assert manifest["student"] == str(out / "student_init")  # built once from the teacher's layers 0 and 2
    assert json.loads((out / "student_init" / "config.json").read_text())["num_hidden_layers"] == 2


def test_loss_paths_agree_with_trls_own_loss(tmp_path):
    """Our compute_loss (compact head, or TRL's kernel without metrics), padded or padding-free,
    equals TRL's stock SFTTrainer.compute_loss on the same batch of uneven lengths."""
    from cot_distill import train as T

    student = make_tiny_student(tmp_path / "student")
    rows = [toy_conversation(3, 4), toy_conversation(12, 30),
            [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}],
            [{"role": "user", "content": "What is 8+9? " * 3}, toy_conversation(8, 9)[1]]]
    with open(tmp_path / "data.jsonl", "w") as handle:
        for messages in rows:
            handle.write(json.dumps({"messages": messages}) + "\n")

    losses = {}
    padded, flat = {"padding_free": False}, {"padding_free": True}
    for name, extra, sft in [("trl", {"token_metrics": True}, padded), ("compact", {"loss_head": "compact"}, padded),
                             ("fused", {"loss_head": "fused"}, padded),
                             ("compact_padding_free", {"loss_head": "compact"}, flat),
                             ("fused_padding_free", {"loss_head": "fused"}, flat)]:
        cfg = TrainSection(student=str(student), dataset=str(tmp_path / "data.jsonl"), output_dir=str(tmp_path / name),
                           sft={**QUICK, "bf16": False, **sft}, **extra)
        args = T.build_sft_config(cfg)
        model, tokenizer = T.load_student(cfg, str(student))
        template, _ = T.resolve_chat_template(tokenizer, cfg)
        end_of_turn = T.find_end_of_turn(tokenizer, template, cfg.assistant_mask)
        dataset = T.tokenize_conversations(T.load_conversations(cfg.dataset), tokenizer, template, cfg, end_of_turn,
                                           128, None)
        trainer = T.DistillSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                      loss_head=cfg.loss_head if cfg.loss_head != "auto" else "compact",
                                      token_metrics=cfg.token_metrics)
        batch = trainer._prepare_inputs(trainer.data_collator([dataset[i] for i in range(len(dataset))]))
        assert ("attention_mask" in batch) != sft["padding_free"]  # padded vs flattened
        with torch.no_grad():
            losses[name] = float(trainer.compute_loss(trainer.model, dict(batch)))
    assert len({round(value, 4) for value in losses.values()}) == 1, losses


# ------------------------------------------------------------------ resuming only checkpoints of the same inputs

TWO_STEPS = {**QUICK, "max_steps": 2, "save_strategy": "steps", "save_steps": 2}  # checkpoint-2 is at max_steps


def two_step_run(tmp_path, capsys, student, data, *, callbacks=(), **changes):
    """run_train for 2 steps into tmp_path/out; returns (manifest, first step trained or None, [train] lines)."""
    _, FirstStep = make_callbacks()
    first = FirstStep()
    settings = {"student": str(student), "dataset": str(data), "output_dir": str(tmp_path / "out"),
                "sft": TWO_STEPS, **IN_PROCESS, **changes}
    cfg = TrainSection.model_validate(settings)
    capsys.readouterr()
    out = run_train(cfg, {}, callbacks=[first, *callbacks])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[train]")]
    return read_manifest(out), first.first_step, lines


def recorded_learning_rate(checkpoint: Path) -> float:
    return json.loads((checkpoint / "inputs_fingerprint.json").read_text())["config"]["sft"]["learning_rate"]


def test_fingerprint_parts_name_what_changed(tmp_path):
    from cot_distill.train import fingerprint_changes, inputs_fingerprint

    student = make_tiny_student(tmp_path / "student")
    data = write_toy_dataset(tmp_path / "data.jsonl", copies=2)
    base = TrainSection(student=str(student), dataset=str(data), output_dir=str(tmp_path / "out"), sft=TWO_STEPS)
    before = inputs_fingerprint(base, str(student))

    def changed(**update):
        return fingerprint_changes(before, inputs_fingerprint(base.model_copy(update=update), str(student)))

    # where and how the run reports is not an input; where the data and the student live is not either
    moved_data = tmp_path / "moved.jsonl"
    moved_data.write_bytes(data.read_bytes())
    assert changed(sft={**TWO_STEPS, "logging_steps": 5, "save_steps": 1, "report_to": "none"},
                   output_dir="elsewhere", resume="force", dataset=str(moved_data), merge=False) == []
    assert changed(sft={**TWO_STEPS, "learning_rate": 5e-4, "warmup_steps": 1}, max_examples=2) == [
        "config: max_examples, sft.learning_rate, sft.warmup_steps"]
    with open(data, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"messages": toy_conversation(6, 1)}) + "\n")
    assert changed() == ["data"]
    make_tiny_student(tmp_path / "student", seed=1)  # other weights in the same folder
    assert changed(sft={**TWO_STEPS, "learning_rate": 5e-4}) == ["student", "config: sft.learning_rate", "data"]


def test_a_served_teachers_new_address_keeps_the_checkpoints_but_another_teacher_does_not(tmp_path):
    """`cot-distill run` serves the on_policy teacher on a new port each time: a rerun resumes its checkpoints."""
    from cot_distill.train import fingerprint_changes, inputs_fingerprint

    student = make_tiny_student(tmp_path / "student")
    data = write_toy_dataset(tmp_path / "data.jsonl", copies=2)
    served = {"base_url": "http://127.0.0.1:8000/v1", "model": "teacher", "top_k": 5}
    base = TrainSection.model_validate({"student": str(student), "dataset": str(data), "method": "on_policy",
                                        "output_dir": str(tmp_path / "out"), "on_policy": {"served": served}})
    before = inputs_fingerprint(base, str(student))

    def changed(**update):
        section = base.model_copy(update={"on_policy": base.on_policy.model_copy(
            update={"served": base.on_policy.served.model_copy(update=update)})})
        return fingerprint_changes(before, inputs_fingerprint(section, str(student)))

    assert changed(base_url="http://127.0.0.1:41234/v1", timeout_s=30, api_key_env="KEY") == []
    assert changed(model="another-teacher", top_k=20) == ["config: on_policy.served.model, on_policy.served.top_k"]


def test_changed_learning_rate_trains_fresh_and_keeps_the_old_checkpoint(tmp_path, capsys):
    student = make_tiny_student(tmp_path / "student")
    data = write_toy_dataset(tmp_path / "data.jsonl", copies=2)  # 4 rows: one step per epoch
    out, stale = tmp_path / "out", tmp_path / "out" / "stale-checkpoints"
    first_run, _, _ = two_step_run(tmp_path, capsys, student, data)
    assert first_run["counts"]["global_step"] == 2 and (out / "checkpoint-2" / "trainer_state.json").exists()

    changed_lr = {"sft": {**TWO_STEPS, "learning_rate": 2e-3}}
    manifest, first_step, lines = two_step_run(tmp_path, capsys, student, data, **changed_lr)
    # Trained again from step 1, not "resumed" at max_steps into a manifest over the old model.
    assert manifest["resumed_from"] is None and first_step == 1 and manifest["counts"]["global_step"] == 2
    assert manifest["inputs_fingerprint"] != first_run["inputs_fingerprint"]
    assert len(lines) == 1 and "checkpoint-2" in lines[0] and "(config: sft.learning_rate)" in lines[0], lines
    assert "starting fresh" in lines[0] and str(stale) in lines[0]
    assert recorded_learning_rate(stale / "checkpoint-2") == 1e-3  # the old run's checkpoint, kept whole
    assert (stale / "checkpoint-2" / "trainer_state.json").exists()
    assert recorded_learning_rate(out / "checkpoint-2") == 2e-3  # the new run's own
    assert not any(name.startswith("stale-checkpoints") for name in manifest["files"])

    # Same inputs (logging and checkpoint rotation are not inputs): the finished checkpoint is resumed.
    same = {"sft": {**TWO_STEPS, "learning_rate": 2e-3, "logging_steps": 2, "save_total_limit": 3}}
    manifest, first_step, lines = two_step_run(tmp_path, capsys, student, data, **same)
    assert manifest["resumed_from"] == str(out / "checkpoint-2") and first_step is None and lines == []
    assert manifest["counts"]["global_step"] == 2 and sorted(p.name for p in stale.iterdir()) == ["checkpoint-2"]


def test_changed_data_trains_fresh_and_old_checkpoints_never_collide(tmp_path, capsys):
    student = make_tiny_student(tmp_path / "student")
    data = write_toy_dataset(tmp_path / "data.jsonl", copies=2)
    out, stale = tmp_path / "out", tmp_path / "out" / "stale-checkpoints"
    two_step_run(tmp_path, capsys, student, data)
    rows = data.read_text().splitlines()
    data.write_text("\n".join([rows[0].replace("add 3 and 4", "3 plus 4"), *rows[1:]]) + "\n")

    manifest, first_step, lines = two_step_run(tmp_path, capsys, student, data)
    assert manifest["resumed_from"] is None and first_step == 1
    assert len(lines) == 1 and "(data)" in lines[0], lines
    assert (stale / "checkpoint-2" / "inputs_fingerprint.json").exists()

    # A checkpoint from before checkpoints recorded their inputs is not trusted either; its name is taken in
    # stale-checkpoints/, so it moves in under another.
    (out / "checkpoint-2" / "inputs_fingerprint.json").unlink()
    manifest, first_step, lines = two_step_run(tmp_path, capsys, student, data)
    assert manifest["resumed_from"] is None and first_step == 1
    assert len(lines) == 1 and "no inputs_fingerprint.json" in lines[0] and "checkpoint-2.1" in lines[0], lines
    assert sorted(p.name for p in stale.iterdir()) == ["checkpoint-2", "checkpoint-2.1"]


def test_resume_force_continues_a_checkpoint_of_other_inputs(tmp_path, capsys):
    student = make_tiny_student(tmp_path / "student")
    data = write_toy_dataset(tmp_path / "data.jsonl", copies=2)
    two_step_run(tmp_path, capsys, student, data)

    manifest, first_step, lines = two_step_run(tmp_path, capsys, student, data, resume="force",
                                               sft={**TWO_STEPS, "learning_rate": 2e-3})
    assert manifest["resumed_from"] == str(tmp_path / "out" / "checkpoint-2") and first_step is None
    assert len(lines) == 1 and "warning" in lines[0] and "sft.learning_rate" in lines[0], lines
    assert not (tmp_path / "out" / "stale-checkpoints").exists()
