"""DistilBERT-style student initialization: the teacher's embeddings, chosen layers, final norm and head."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_train_support import make_tiny_student  # noqa: E402

from cot_distill.train.student_init import (  # noqa: E402
    build_student_from_teacher,
    init_student_from_teacher,
    resolve_kept_layers,
)


def run_teacher_layers_by_hand(teacher, input_ids, kept):
    """embed -> the kept teacher layers in order -> final norm -> head, written out without the student."""
    inner = teacher.model
    hidden = inner.embed_tokens(input_ids)
    positions = torch.arange(input_ids.shape[1])[None].expand(input_ids.shape[0], -1)
    position_embeddings = inner.rotary_emb(hidden, positions)
    for index in kept:
        # attention_mask=None: SDPA applies the causal mask itself (no padding here)
        out = inner.layers[index](hidden, attention_mask=None, position_embeddings=position_embeddings,
                                  position_ids=positions)
        hidden = out[0] if isinstance(out, tuple) else out
    return teacher.lm_head(inner.norm(hidden))


def test_resolve_kept_layers():
    assert resolve_kept_layers(8, every=2) == [0, 2, 4, 6, 7]  # the last layer always stays
    assert resolve_kept_layers(9, every=2) == [0, 2, 4, 6, 8]
    assert resolve_kept_layers(4, keep_layers=[0, 3]) == [0, 3]
    with pytest.raises(ValueError, match="out of range"):
        resolve_kept_layers(4, keep_layers=[0, 4])
    with pytest.raises(ValueError):
        resolve_kept_layers(4, keep_layers=[1], every=2)


@pytest.mark.parametrize("family,tied", [("llama", False), ("qwen2", False), ("qwen3", False), ("qwen3", True)])
def test_student_equals_the_teachers_chosen_layers(tmp_path, family, tied):
    from transformers import AutoModelForCausalLM

    teacher_dir = make_tiny_student(tmp_path / "teacher", family=family, layers=5, seed=1, tied=tied)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    kept = [0, 2, 4]
    student = build_student_from_teacher(teacher, kept).eval()

    assert student.config.num_hidden_layers == 3 and type(student) is type(teacher)
    per_layer = sum(p.numel() for p in teacher.model.layers[0].parameters())
    n_params = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert n_params(student) == n_params(teacher) - 2 * per_layer
    for name, tensor in student.state_dict().items():
        assert tensor.shape == teacher.state_dict()[name].shape, name
    assert torch.equal(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[2].mlp.up_proj.weight)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    if tied:  # still one matrix in the student
        assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    # copies, not views: training the student must not move the teacher
    assert student.model.embed_tokens.weight.data_ptr() != teacher.model.embed_tokens.weight.data_ptr()

    input_ids = torch.randint(0, teacher.config.vocab_size, (2, 12))
    with torch.no_grad():
        expected = run_teacher_layers_by_hand(teacher, input_ids, kept)
        assert torch.allclose(student(input_ids).logits, expected, atol=1e-5)
        # and the check can fail: other layers give other logits
        assert not torch.allclose(run_teacher_layers_by_hand(teacher, input_ids, [0, 1, 4]), expected, atol=1e-3)


def test_init_student_from_teacher_saves_a_loadable_student(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher_dir = make_tiny_student(tmp_path / "teacher", family="qwen3", layers=4)
    out = init_student_from_teacher(str(teacher_dir), tmp_path / "student", every=2)
    student = AutoModelForCausalLM.from_pretrained(out)
    assert student.config.num_hidden_layers == 3  # layers 0, 2 and the last (3)
    assert student.config.student_init["kept_layers"] == [0, 2, 3]
    assert len(student.config.layer_types) == 3
    assert (out / "generation_config.json").exists()
    assert AutoTokenizer.from_pretrained(out).chat_template is not None


def test_ensure_student_init_builds_once_and_again_when_init_from_changes(tmp_path):
    from transformers import AutoConfig

    from cot_distill.config.train import InitFrom
    from cot_distill.train.student_init import ensure_student_init

    teacher_dir = make_tiny_student(tmp_path / "teacher", family="qwen3", layers=4)
    folder = tmp_path / "student_init"
    ensure_student_init(InitFrom(model=str(teacher_dir), every=2), folder)
    built_at = (folder / "model.safetensors").stat().st_mtime_ns
    ensure_student_init(InitFrom(model=str(teacher_dir), every=2), folder)
    assert (folder / "model.safetensors").stat().st_mtime_ns == built_at  # same init_from: reused

    ensure_student_init(InitFrom(model=str(teacher_dir), keep_layers=[0, 1]), folder)
    assert AutoConfig.from_pretrained(folder).student_init["kept_layers"] == [0, 1]


def teacher_with_a_dead_layer(folder: Path, dead: int) -> Path:
    """A tiny 4-layer teacher whose layer `dead` adds nothing to the residual stream (its attention and MLP output
    projections are zero): both scores must find it unimportant."""
    from transformers import AutoModelForCausalLM

    make_tiny_student(folder, layers=4, seed=3)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        layer = model.model.layers[dead]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    model.to(torch.bfloat16).save_pretrained(folder)  # bf16 like real checkpoints: the student must stay bf16
    return folder


@pytest.mark.parametrize("score", ["block_importance", "skip_loss"])
def test_keep_auto_drops_the_layer_that_does_nothing_and_records_why(tmp_path, score):
    import json

    from test_train_support import write_toy_dataset

    from cot_distill.config.train import InitFrom
    from cot_distill.train.student_init import LAYER_SCORES, ensure_student_init

    teacher = teacher_with_a_dead_layer(tmp_path / "teacher", dead=2)
    dataset = write_toy_dataset(tmp_path / "rows.jsonl")
    init = InitFrom(model=str(teacher), keep="auto", layers=3, score=score, calibration_rows=8)
    folder = ensure_student_init(init, tmp_path / "student_init", str(dataset))
    choice = json.loads((folder / LAYER_SCORES).read_text())
    scores = choice["scores"]
    assert len(scores) == 4 and scores[2] == pytest.approx(0, abs=1e-5) and choice["calibration_rows"] == 8
    assert choice["kept_layers"] == sorted(sorted(range(4), key=lambda i: -scores[i])[:3])
    if score == "block_importance":  # every live layer turns its input; the dead one does not
        assert choice["kept_layers"] == [0, 1, 3] and min(scores[i] for i in (0, 1, 3)) > 1e-3
    else:  # in a random model, skipping a live layer can also lower the loss (a negative score)
        assert all(abs(scores[i]) > 1e-4 for i in (0, 1, 3))
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(folder).num_hidden_layers == 3
    again = ensure_student_init(init, tmp_path / "student_init-2", str(dataset))
    assert AutoConfig.from_pretrained(folder).dtype == AutoConfig.from_pretrained(teacher).dtype
    assert json.loads((again / LAYER_SCORES).read_text()) == choice  # deterministic


def test_keep_auto_settings_are_checked():
    from pydantic import ValidationError

    from cot_distill.config.train import InitFrom

    with pytest.raises(ValidationError, match="needs `layers`"):
        InitFrom(model="m", keep="auto")
    with pytest.raises(ValidationError, match="exactly one of"):
        InitFrom(model="m", keep="auto", layers=2, every=3)


def test_init_from_without_keep_auto_dumps_as_before():
    """Existing recipes' student_init records and train fingerprints must not change with the new keys."""
    from cot_distill.config.train import InitFrom

    assert InitFrom(model="m", every=2).model_dump(mode="json") == {"model": "m", "keep_layers": None, "every": 2}
    assert "score" in InitFrom(model="m", keep="auto", layers=3).model_dump(mode="json")
