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
