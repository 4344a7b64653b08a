"""method: kd end to end on tiny models: the trainer's chunked loss equals cot_distill.kd on full logits, training
pulls the student toward the teacher, LoRA + init_from's default teacher, and the vocabulary check."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from test_train_support import make_tiny_student, toy_conversation, write_toy_dataset  # noqa: E402

from cot_distill import train as T  # noqa: E402
from cot_distill.config.train import TrainSection  # noqa: E402
from cot_distill.kd import distillation_loss  # noqa: E402
from cot_distill.records import read_manifest  # noqa: E402
from cot_distill.teachers.serve import free_port  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

QUICK = dict(per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, save_strategy="no", seed=0,
             max_length=128)
IN_PROCESS = dict(tune_cpu_allocator=False)  # process-wide; kept out of the shared pytest process


def peaked_teacher(folder: Path, scale: float = 30.0) -> Path:
    """A random tiny model (3 layers, wider than the student) whose LM head is scaled up: confident next-token
    distributions unrelated to the data, so only the KL term can bring the student close to them."""
    from transformers import AutoModelForCausalLM

    make_tiny_student(folder, layers=3, hidden=96, seed=1)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    model.save_pretrained(folder)
    return folder


def padded_batch(cfg: TrainSection, model_dir: Path) -> dict:
    """The training rows as the trainer tokenizes them, right-padded into one batch."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template, _ = T.resolve_chat_template(tokenizer, cfg)
    end_of_turn = T.find_end_of_turn(tokenizer, template, cfg.assistant_mask)
    rows = T.tokenize_conversations(T.load_conversations(cfg.dataset), tokenizer, template, cfg, end_of_turn, 128,
                                    None)
    width = max(len(row["input_ids"]) for row in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return {"input_ids": torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"]))
                                            for r in rows]),
            "labels": torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows])}


def full_logits_loss(student, teacher, batch: dict, alpha: float, beta: float, temperature: float,
                     kl: str = "forward") -> float:
    """The reference: plain forwards over every position, shifted by hand, then cot_distill.kd.distillation_loss."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        student_logits, teacher_logits = student(**inputs).logits, teacher(**inputs).logits
    return distillation_loss(student_logits[:, :-1], teacher_logits[:, :-1], batch["labels"][:, 1:], alpha, beta,
                             temperature, kl).item()


def raw_kl(model_dir: Path, teacher_dir: Path, batch: dict, temperature: float) -> float:
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    return full_logits_loss(student, teacher, batch, 0.0, 1.0, temperature) / temperature**2


def kd_trainer_and_batch(cfg: TrainSection, student_dir: Path):
    """The kd trainer as run_train builds it (student, every kd teacher, tokenized rows) and all rows as one batch."""
    model, tokenizer = T.load_student(cfg, str(student_dir))
    teachers = [teacher for teacher, _ in T.load_teachers(cfg, model, tokenizer, str(student_dir))]
    template, _ = T.resolve_chat_template(tokenizer, cfg)
    end_of_turn = T.find_end_of_turn(tokenizer, template, cfg.assistant_mask)
    dataset = T.tokenize_conversations(T.load_conversations(cfg.dataset), tokenizer, template, cfg, end_of_turn, 128,
                                       None)
    trainer = T.DistillSFTTrainer(model=model, args=T.build_sft_config(cfg), train_dataset=dataset,
                                  processing_class=tokenizer, teacher=teachers, kd=cfg.kd)
    return trainer, trainer._prepare_inputs(trainer.data_collator([dataset[i] for i in range(len(dataset))]))


def log_recorder():
    from transformers import TrainerCallback

    class Logs(TrainerCallback):
        def __init__(self):
            self.entries = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.entries.append(dict(logs))

    return Logs()


@pytest.mark.parametrize("padding_free,chunk_tokens,kl", [(False, 1024, "forward"), (False, 5, "reverse"),
                                                          (True, 7, "forward")])
def test_trainer_loss_equals_distillation_loss_on_full_logits(tmp_path, padding_free, chunk_tokens, kl):
    student_dir = make_tiny_student(tmp_path / "student")
    teacher_dir = peaked_teacher(tmp_path / "teacher")
    rows = [toy_conversation(3, 4), toy_conversation(12, 30),
            [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]]
    with open(tmp_path / "data.jsonl", "w") as handle:
        for messages in rows:
            handle.write(json.dumps({"messages": messages}) + "\n")
    kd = {"teacher": str(teacher_dir), "alpha": 0.3, "beta": 0.7, "temperature": 2.0, "kl": kl,
          "chunk_tokens": chunk_tokens}
    cfg = TrainSection(student=str(student_dir), dataset=str(tmp_path / "data.jsonl"), output_dir=str(tmp_path / "o"),
                       method="kd", kd=kd, sft={**QUICK, "bf16": False, "padding_free": padding_free})
    trainer, batch = kd_trainer_and_batch(cfg, student_dir)
    model, [teacher] = trainer.model, trainer.teachers
    assert ("attention_mask" in batch) != padding_free
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch)).item()

    expected = full_logits_loss(model, teacher, padded_batch(cfg, student_dir), 0.3, 0.7, 2.0, kl)
    assert loss == pytest.approx(expected, rel=1e-4)
    assert trainer._metrics["eval"]["kl_loss"][0] > 0  # no_grad in eval mode: logged under eval


def test_kd_pulls_the_student_toward_the_teacher_and_logs_both_parts(tmp_path):
    student_dir = make_tiny_student(tmp_path / "student")
    teacher_dir = peaked_teacher(tmp_path / "teacher")
    data = write_toy_dataset(tmp_path / "data.jsonl", copies=8)
    temperature = 2.0
    # alpha 0: the data's labels alone would not move the student toward this teacher; the KL term must.
    cfg = TrainSection(student=str(student_dir), dataset=str(data), output_dir=str(tmp_path / "out"), method="kd",
                       kd={"teacher": str(teacher_dir), "alpha": 0.0, "beta": 1.0, "temperature": temperature,
                           "chunk_tokens": 16},
                       sft={**QUICK, "max_steps": 20, "learning_rate": 5e-3, "lr_scheduler_type": "constant"},
                       **IN_PROCESS)
    batch = padded_batch(cfg, student_dir)
    kl_before = raw_kl(student_dir, teacher_dir, batch, temperature)
    logs = log_recorder()
    out = T.run_train(cfg, {"train": cfg.model_dump()}, callbacks=[logs])

    manifest = read_manifest(out)
    assert manifest["complete"] and manifest["counts"]["global_step"] == 20
    assert manifest["method"] == "kd" and manifest["teacher"] == str(teacher_dir)
    assert "model.safetensors" in manifest["files"]
    assert len(logs.entries) == 20
    for entry in logs.entries:
        assert math.isfinite(entry["ce_loss"]) and math.isfinite(entry["kl_loss"]) and entry["kl_loss"] >= 0
        # the logged total is alpha * ce + beta * tau^2 * kl (bf16 autocast: loose)
        assert entry["loss"] == pytest.approx(temperature**2 * entry["kl_loss"], rel=1e-3)
    assert logs.entries[-1]["kl_loss"] < logs.entries[0]["kl_loss"]
    kl_after = raw_kl(out, teacher_dir, batch, temperature)
    assert kl_after < 0.5 * kl_before, (kl_before, kl_after)


def test_lora_kd_with_init_from_distills_from_the_init_teacher(tmp_path):
    from safetensors.torch import load_file

    teacher_dir = make_tiny_student(tmp_path / "teacher", layers=3)
    data = write_toy_dataset(tmp_path / "data.jsonl", copies=4)
    cfg = TrainSection(init_from={"model": str(teacher_dir), "keep_layers": [0, 2]}, dataset=str(data),
                       output_dir=str(tmp_path / "out"), method="kd", kd={"chunk_tokens": 8},
                       lora={"r": 8, "alpha": 16}, sft={**QUICK, "max_steps": 3, "learning_rate": 1e-2}, **IN_PROCESS)
    assert cfg.kd.teacher == str(teacher_dir)  # the default teacher: the model the student was cut from
    logs = log_recorder()
    out = T.run_train(cfg, {}, callbacks=[logs])

    manifest = read_manifest(out)
    assert manifest["adapter"] and manifest["teacher"] == str(teacher_dir)
    assert all(math.isfinite(entry["ce_loss"]) and math.isfinite(entry["kl_loss"]) for entry in logs.entries)
    # A student cut from the teacher starts close to it, but not equal (one layer fewer).
    assert logs.entries[0]["kl_loss"] > 0
    adapter = load_file(str(out / "adapter_model.safetensors"))
    lora_b = [tensor for name, tensor in adapter.items() if "lora_B" in name]
    assert lora_b and any(torch.count_nonzero(tensor) for tensor in lora_b)  # zero-initialized; the KD loss moved it


def test_kd_under_accelerate_ddp_on_two_cpu_processes(tmp_path):
    """The teacher outside DDP, the chunked head (recomputed in backward) inside the student's DDP forward."""
    student_dir = make_tiny_student(tmp_path / "student")
    teacher_dir = peaked_teacher(tmp_path / "teacher")
    data = write_toy_dataset(tmp_path / "data.jsonl", copies=4)  # 8 rows = 2 steps of 2 ranks x 2 rows
    section = {"student": str(student_dir), "dataset": str(data), "output_dir": str(tmp_path / "out"), "method": "kd",
               "kd": {"teacher": str(teacher_dir), "chunk_tokens": 16},
               "sft": {"max_steps": 2, "per_device_train_batch_size": 2, "save_strategy": "no", "logging_steps": 1,
                       "learning_rate": 1e-3, "seed": 0, "max_length": 128}}
    config_file = tmp_path / "train.yaml"
    config_file.write_text(yaml.safe_dump(section))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "recipes" / "accelerate" / "ddp.yaml"), "--num_processes", "2",
               "--main_process_port", str(free_port()), "-m", "cot_distill.train", str(config_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, timeout=420, cwd=REPO, env=env)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]

    assert sorted(re.findall(r"cot_distill\.train: rank (\d+) done", log)) == ["0", "1"], log[-2000:]
    manifest = read_manifest(tmp_path / "out")
    assert manifest["world_size"] == 2 and manifest["counts"]["global_step"] == 2 and manifest["method"] == "kd"
    logged = re.findall(r"'loss': '([\d.e+-]+)'.*?'ce_loss': '([\d.e+-]+)', 'kl_loss': '([\d.e+-]+)'", log)
    assert len(logged) == 2, log[-2000:]
    for loss, ce, kl in logged:  # the parts are gathered over both ranks, like the loss
        assert float(loss) == pytest.approx(0.5 * float(ce) + 0.5 * 4.0 * float(kl), rel=2e-3)


def swap_two_token_ids(tokenizer_json: Path) -> None:
    data = json.loads(tokenizer_json.read_text())
    vocab = data["model"]["vocab"]
    first, second = "a", "b"
    vocab[first], vocab[second] = vocab[second], vocab[first]
    tokenizer_json.write_text(json.dumps(data))


@pytest.mark.parametrize("mismatch", ["size", "tokens"])
def test_a_teacher_with_another_vocabulary_is_refused_before_training(tmp_path, mismatch):
    from transformers import AutoModelForCausalLM

    student_dir = make_tiny_student(tmp_path / "student")
    teacher_dir = make_tiny_student(tmp_path / "teacher")
    size = AutoModelForCausalLM.from_pretrained(student_dir).config.vocab_size
    if mismatch == "size":
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
        teacher.resize_token_embeddings(size + 16)
        teacher.save_pretrained(teacher_dir)
    else:
        swap_two_token_ids(teacher_dir / "tokenizer.json")
    data = write_toy_dataset(tmp_path / "data.jsonl", copies=1)
    cfg = TrainSection(student=str(student_dir), dataset=str(data), output_dir=str(tmp_path / "out"), method="kd",
                       kd={"teacher": str(teacher_dir)}, sft={**QUICK, "max_steps": 1}, **IN_PROCESS)
    with pytest.raises(ValueError) as error:
        T.run_train(cfg, {})
    message = str(error.value)
    assert str(student_dir) in message and str(teacher_dir) in message and f"vocab_size {size}" in message
    if mismatch == "size":
        assert f"vocab_size {size + 16}" in message
    else:
        assert "different ids" in message
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_kd_leaves_the_allocator_alone_unless_asked():
    """A never-trimmed heap (tune_cpu_allocator) fragments under kd's varying vocabulary-sized temporaries: the
    demo's kd run reached 24 GB RSS by step 43 with it, ~5 GB without."""
    from cot_distill.config.train import TrainSection
    from cot_distill.train import wants_allocator_tuning

    base = {"init_from": {"model": "m", "every": 2}, "output_dir": "o"}
    assert wants_allocator_tuning(TrainSection(**base)) is True
    assert wants_allocator_tuning(TrainSection(**base, method="kd")) is False
    assert wants_allocator_tuning(TrainSection(**base, method="kd", tune_cpu_allocator=True)) is True
    assert wants_allocator_tuning(TrainSection(**base, tune_cpu_allocator=False)) is False


def test_a_mixture_of_two_teachers_trains_on_their_weighted_mixture(tmp_path):
    """kd.teachers: the trainer's loss is cot_distill.kd's on both teachers' full logits with weights 2:1 (scaled
    to 2/3 and 1/3), and the manifest names both teachers with their weights."""
    student_dir = make_tiny_student(tmp_path / "student")
    sharp, soft = peaked_teacher(tmp_path / "sharp", scale=30.0), peaked_teacher(tmp_path / "soft", scale=3.0)
    data = write_toy_dataset(tmp_path / "data.jsonl", copies=2)
    kd = {"teachers": [{"model": str(sharp), "weight": 2}, {"model": str(soft), "weight": 1}], "alpha": 0.3,
          "beta": 0.7, "temperature": 2.0, "chunk_tokens": 5}
    cfg = TrainSection(student=str(student_dir), dataset=str(data), output_dir=str(tmp_path / "o"), method="kd",
                       kd=kd, sft={**QUICK, "bf16": False, "max_steps": 2}, **IN_PROCESS)
    trainer, batch = kd_trainer_and_batch(cfg, student_dir)
    model, teachers = trainer.model, trainer.teachers
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch)).item()

    reference = padded_batch(cfg, student_dir)
    inputs = {"input_ids": reference["input_ids"], "attention_mask": reference["attention_mask"]}
    with torch.no_grad():
        logits = [net(**inputs).logits[:, :-1] for net in (model, *teachers)]
    labels = reference["labels"][:, 1:]
    expected = distillation_loss(logits[0], logits[1:], labels, 0.3, 0.7, 2.0, teacher_weights=[2 / 3, 1 / 3])
    assert loss == pytest.approx(expected.item(), rel=1e-4)
    only_sharp = distillation_loss(logits[0], logits[1], labels, 0.3, 0.7, 2.0).item()
    assert abs(loss - only_sharp) > 1e-3 * abs(only_sharp)  # the second teacher counts

    out = T.run_train(cfg, {"train": cfg.model_dump()})
    manifest = read_manifest(out)
    assert [teacher["weight"] for teacher in manifest["teachers"]] == pytest.approx([2 / 3, 1 / 3])
    assert [teacher["path"] for teacher in manifest["teachers"]] == [str(sharp), str(soft)]
