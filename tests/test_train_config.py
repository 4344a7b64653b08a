"""TrainSection validation, the GPU recipe and the accelerate configs (no training here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from cot_distill.config.train import TrainSection
from cot_distill.hardware import cpu_has_native_bf16

REPO = Path(__file__).resolve().parent.parent
ACCELERATE_CONFIGS = sorted((REPO / "recipes" / "accelerate").glob("*.yaml"))
GPU_RECIPE = REPO / "recipes" / "r1-distill-gpu.yaml"


def test_minimal_section_and_defaults():
    cfg = TrainSection(student="some/model", dataset="data.jsonl", output_dir="out")
    assert cfg.method == "sft" and cfg.lora is None and cfg.merge is False
    assert cfg.reasoning_format == "think_tags" and cfg.bf16_autocast_on_cpu == "auto"
    assert cfg.assistant_mask == "final_turn" and cfg.resume is True


@pytest.mark.parametrize("bad", [
    {"student": "m", "output_dir": "o", "learning_rate": 1e-5},            # unknown top-level key
    {"student": "m", "output_dir": "o", "lora": {"r": 8, "rank": 8}},      # unknown lora key
    {"output_dir": "o"},                                                    # no student source
    {"student": "m", "init_from": {"model": "t", "every": 2}, "output_dir": "o"},  # two student sources
    {"init_from": {"model": "t"}, "output_dir": "o"},                       # neither keep_layers nor every
    {"init_from": {"model": "t", "every": 2, "keep_layers": [0]}, "output_dir": "o"},
    {"init_from": {"model": "t", "keep_layers": [0, 0]}, "output_dir": "o"},
    {"student": "m", "output_dir": "o", "merge": True},                     # merge without lora
    {"student": "m", "output_dir": "o", "method": "dpo"},
    {"student": "m", "output_dir": "o", "sft": {"output_dir": "elsewhere"}},
    {"student": "m", "output_dir": "o", "sft": {"assistant_only_loss": True}},
])
def test_invalid_sections_fail(bad):
    with pytest.raises(ValidationError):
        TrainSection.model_validate(bad)


KD_TEACHER = {"student": "m", "output_dir": "o", "method": "kd"}


@pytest.mark.parametrize("bad", [
    {"student": "m", "output_dir": "o", "kd": {"teacher": "t"}},            # kd settings under method sft
    {"student": "m", "output_dir": "o", "method": "kd"},                    # no teacher and no init_from
    {**KD_TEACHER, "kd": {"teacher": "t", "temperature": 0}},
    {**KD_TEACHER, "kd": {"teacher": "t", "temperature": -1.0}},
    {**KD_TEACHER, "kd": {"teacher": "t", "alpha": -0.1}},
    {**KD_TEACHER, "kd": {"teacher": "t", "alpha": 0, "beta": 0}},         # nothing to train
    {**KD_TEACHER, "kd": {"teacher": "t", "kl": "jsd"}},
    {**KD_TEACHER, "kd": {"teacher": "t", "chunk_tokens": 0}},
    {**KD_TEACHER, "kd": {"teacher": "t", "tau": 2}},                       # unknown kd key
    {**KD_TEACHER, "kd": {"teacher": "t"}, "loss_head": "fused"},           # kd always runs the compact head
    {**KD_TEACHER, "kd": {"teacher": "t"}, "token_metrics": True},          # needs TRL's own loss
])
def test_invalid_kd_sections_fail(bad):
    with pytest.raises(ValidationError):
        TrainSection.model_validate(bad)


def test_kd_defaults_and_teacher_from_init_from():
    cfg = TrainSection.model_validate({**KD_TEACHER, "kd": {"teacher": "t"}})
    assert (cfg.kd.alpha, cfg.kd.beta, cfg.kd.temperature, cfg.kd.kl) == (0.5, 0.5, 2.0, "forward")
    assert cfg.kd.chunk_tokens == 1024
    from_init = TrainSection(init_from={"model": "big", "every": 2}, output_dir="o", method="kd")
    assert from_init.kd.teacher == "big"  # explicit in the resolved config
    assert TrainSection.model_validate(from_init.model_dump()) == from_init
    # An sft section dumps without a `kd` key, as before kd existed (pipeline fingerprints stay the same).
    assert "kd" not in TrainSection(student="m", output_dir="o").model_dump(mode="json")


def test_unknown_sft_key_fails_when_building_the_trl_config():
    from cot_distill.train import build_sft_config

    cfg = TrainSection(student="m", output_dir="o", sft={"learning_rat": 1e-5})
    with pytest.raises(TypeError, match="learning_rat"):
        build_sft_config(cfg)


def test_cpu_defaults_are_applied_only_when_unset(tmp_path):
    from cot_distill.train import build_sft_config

    defaults = build_sft_config(TrainSection(student="m", output_dir=str(tmp_path)))
    assert defaults.bf16 is cpu_has_native_bf16() and defaults.use_cpu is True
    assert defaults.gradient_checkpointing is False
    on = build_sft_config(TrainSection(student="m", output_dir=str(tmp_path), bf16_autocast_on_cpu=True))
    assert on.bf16 is True
    assert defaults.padding_free is False and defaults.max_length == 1024
    flat = build_sft_config(TrainSection(student="m", output_dir=str(tmp_path), sft={"padding_free": True}))
    assert flat.padding_free is True and flat.max_length is None  # max_length is enforced by our tokenization
    explicit = build_sft_config(TrainSection(student="m", output_dir=str(tmp_path),
                                             sft={"bf16": False, "gradient_checkpointing": True}))
    assert explicit.bf16 is False and explicit.gradient_checkpointing is True
    off = build_sft_config(TrainSection(student="m", output_dir=str(tmp_path), bf16_autocast_on_cpu=False))
    assert off.bf16 is False
    packed = build_sft_config(TrainSection(student="m", output_dir=str(tmp_path), sft={"packing": True}))
    assert packed.max_length == 1024  # packing keeps TRL's bins of max_length


def test_gpu_recipe_validates_and_builds_an_sft_config():
    from cot_distill.train import build_sft_config

    cfg = TrainSection.model_validate(yaml.safe_load(GPU_RECIPE.read_text())["train"])
    assert cfg.sft["learning_rate"] == 4e-5 and cfg.sft["num_train_epochs"] == 5
    assert cfg.sft["max_length"] == 32768 and cfg.sft["lr_scheduler_type"] == "cosine_with_min_lr"
    args = build_sft_config(cfg)  # on this CPU machine run_train adds use_cpu=True; nothing else is altered
    assert args.learning_rate == 4e-5 and args.num_train_epochs == 5
    assert args.lr_scheduler_type == "cosine_with_min_lr" and args.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    assert args.bf16 is True and args.gradient_checkpointing is True and args.padding_free is True
    assert args.max_length is None  # padding-free: max_length is enforced by our tokenization (overlong: drop)


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_loads_with_accelerates_own_loader(path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    config = load_config_from_file(str(path))  # raises on unknown top-level keys
    assert isinstance(config, ClusterConfig)
    # Nested deepspeed/fsdp keys are copied onto `accelerate launch` arguments; an unknown one would be ignored.
    known = {action.dest for action in launch_command_parser()._actions}
    nested = {**(config.deepspeed_config or {}), **(config.fsdp_config or {})}
    assert set(nested) <= known, set(nested) - known


def test_accelerate_configs_cover_ddp_zero2_zero3_fsdp():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {}
    for path in ACCELERATE_CONFIGS:
        config = load_config_from_file(str(path))
        kind = config.distributed_type.value
        if kind == "DEEPSPEED":
            kind += str(config.deepspeed_config["zero_stage"])
        kinds[kind] = path.name
    assert {"MULTI_GPU", "DEEPSPEED2", "DEEPSPEED3", "FSDP"} <= set(kinds), kinds


@pytest.mark.parametrize("value", [True, False, "force"])
def test_resume_is_true_false_or_force(value):
    cfg = TrainSection(student="m", output_dir="o", resume=value)
    assert cfg.resume == value and TrainSection.model_validate(cfg.model_dump(mode="json")) == cfg


@pytest.mark.parametrize("value", ["forced", "yes", "true", 1, None])
def test_resume_rejects_anything_else(value):
    with pytest.raises(ValidationError, match=r'train.resume must be true, false or "force"'):
        TrainSection(student="m", output_dir="o", resume=value)


def test_cpu_dtype_follows_the_cpu_flags(monkeypatch):
    from cot_distill import hardware

    for flags, native in (({"avx2", "fma"}, False), ({"avx2", "avx512f", "avx512_bf16"}, True),
                          ({"avx2", "amx_bf16", "amx_tile"}, True), ({"fp", "asimd", "bf16"}, True)):
        hardware.cpu_has_native_bf16.cache_clear()
        monkeypatch.setattr(hardware, "_cpu_flags", lambda flags=flags: flags)
        assert hardware.cpu_has_native_bf16() is native
        assert hardware.cpu_dtype() == ("bfloat16" if native else "float32")
    hardware.cpu_has_native_bf16.cache_clear()
