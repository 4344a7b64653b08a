"""Build a smaller student from a teacher's own layers (DistilBERT-style initialization).

The student is the teacher's architecture with fewer decoder layers: it gets the teacher's embeddings, the chosen
decoder layers (in order), the final norm and the LM head, copied weight for weight. Starting from the teacher's
weights instead of random ones keeps the student's hidden states in the space the norm and head were trained on.

Works for any decoder whose weights live under `...layers.<i>.` (Llama, Qwen2, Qwen3, Mistral, ...): the copy is a
state-dict renumbering, and `load_state_dict(strict=True)` proves every student weight came from the teacher.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

_LAYER_KEY = re.compile(r"(^|\.)layers\.(\d+)\.")
# Per-layer config lists (sliding/full attention per layer) that must shrink with the layer count.
_PER_LAYER_CONFIG_LISTS = ("layer_types",)


def resolve_kept_layers(num_layers: int, keep_layers: list[int] | None = None, every: int | None = None) -> list[int]:
    """The teacher layers to copy. `every=k` keeps 0, k, 2k, ... and always the last layer, whose output is what
    the final norm and LM head were trained to read."""
    if (keep_layers is None) == (every is None):
        raise ValueError("give exactly one of keep_layers or every")
    if every is not None:
        kept = list(range(0, num_layers, every))
        if kept[-1] != num_layers - 1:
            kept.append(num_layers - 1)
        return kept
    out_of_range = [index for index in keep_layers if not 0 <= index < num_layers]
    if out_of_range:
        raise ValueError(f"keep_layers {out_of_range} out of range: the teacher has {num_layers} layers")
    if len(set(keep_layers)) != len(keep_layers):
        raise ValueError(f"keep_layers has duplicates: {keep_layers}")
    return list(keep_layers)


def student_config(teacher_config, kept: list[int]):
    """The teacher's config with only the kept layers."""
    config = copy.deepcopy(teacher_config)
    text_config = config.get_text_config()
    for name in _PER_LAYER_CONFIG_LISTS:
        values = getattr(text_config, name, None)
        if isinstance(values, list) and len(values) == text_config.num_hidden_layers:
            setattr(text_config, name, [values[index] for index in kept])
    text_config.num_hidden_layers = len(kept)
    if getattr(text_config, "max_window_layers", None) is not None:
        # Qwen2: layers below max_window_layers use full attention; keep the same fraction of them.
        text_config.max_window_layers = sum(1 for index in kept if index < teacher_config.max_window_layers)
    return config


def renumber_layers(teacher_state: dict, kept: list[int]) -> dict:
    """Teacher state dict -> student state dict: layer kept[j] becomes layer j; dropped layers disappear."""
    new_index = {old: new for new, old in enumerate(kept)}
    student_state = {}
    for key, tensor in teacher_state.items():
        match = _LAYER_KEY.search(key)
        if match is None:  # embeddings, final norm, LM head, rotary buffers
            student_state[key] = tensor
            continue
        old = int(match.group(2))
        if old in new_index:
            renamed = f"{match.group(1)}layers.{new_index[old]}."
            student_state[key[: match.start()] + renamed + key[match.end():]] = tensor
    return student_state


def build_student_from_teacher(teacher, kept: list[int]):
    """A new model of the teacher's class holding the kept layers' weights (copies, not views)."""
    import torch

    config = student_config(teacher.config, kept)
    with _skip_random_init():  # every weight is overwritten below; random init of a multi-B model takes minutes
        student = type(teacher)(config).to(teacher.dtype)
    state = {key: tensor.detach().clone() for key, tensor in renumber_layers(teacher.state_dict(), kept).items()}
    missing, unexpected = student.load_state_dict(state, strict=False)
    # Tied LM heads may be absent from the state dict on one side; anything else missing means a weight was not
    # copied from the teacher, which must never pass silently.
    tied = {"lm_head.weight"} if getattr(config.get_text_config(), "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"layer copy mismatch: missing={sorted(set(missing) - tied)} unexpected={unexpected}")
    student.generation_config = copy.deepcopy(teacher.generation_config)
    with torch.no_grad():
        student.tie_weights()
    return student


def _skip_random_init():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: pay for the random init
        import contextlib

        return contextlib.nullcontext()
    return no_init_weights()


def init_student_from_teacher(teacher_path: str, output_dir: str | Path, keep_layers: list[int] | None = None,
                              every: int | None = None, auto=None, dataset: str | None = None) -> Path:
    """Load the teacher, build the layer-subset student and save it (weights, config, generation_config and the
    teacher's tokenizer when it has one) to output_dir. `auto`: an InitFrom with keep: auto, whose layers are
    chosen by score on `dataset`'s first rows (LAYER_SCORES in output_dir records the choice). Returns
    output_dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output_dir = Path(output_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype="auto")
    choice = None
    if auto is not None:
        dtype = teacher.dtype  # scoring runs in float32; the student keeps the teacher's dtype as without keep: auto
        choice = measured_choice(teacher, AutoTokenizer.from_pretrained(teacher_path), auto, dataset)
        teacher.to(dtype)
        kept = choice["kept_layers"]
    else:
        kept = resolve_kept_layers(teacher.config.get_text_config().num_hidden_layers, keep_layers, every)
    student = build_student_from_teacher(teacher, kept)
    student.config.student_init = {"teacher": str(teacher_path), "kept_layers": kept}
    if choice is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / LAYER_SCORES).write_text(json.dumps(choice, indent=1) + "\n")
    student.save_pretrained(output_dir)
    try:
        AutoTokenizer.from_pretrained(teacher_path).save_pretrained(output_dir)
    except (OSError, ValueError):
        pass  # a teacher without a tokenizer: the student is still usable with one supplied later
    return output_dir


INIT_RECORD = "init_from.json"
LAYER_SCORES = "layer_scores.json"  # keep: auto: the score of every teacher layer and the layers kept


def measured_choice(teacher, tokenizer, auto, dataset: str | None) -> dict:
    """keep: auto's layers and the scores behind them, on the first calibration_rows rows of `dataset`."""
    import torch

    from cot_distill.train.layer_scores import calibration_batches, choose_layers, score_layers
    from cot_distill.train.masking import TrainError, load_conversations, normalize_messages

    if dataset is None:
        raise TrainError("init_from.keep: auto scores the teacher's layers on the training data: set train.dataset "
                         "(cot-distill run sets it to the curated data)")
    rows = load_conversations(dataset)
    conversations = [normalize_messages(row["messages"], "think_tags")[0]
                     for row in rows.select(range(min(auto.calibration_rows, len(rows))))]
    batches = calibration_batches(tokenizer, conversations, auto.calibration_max_length)
    scores = score_layers(teacher.to(torch.float32), batches, auto.score)
    return {"score": auto.score, "layers": auto.layers, "calibration_rows": len(conversations),
            "scores": [round(value, 6) for value in scores], "kept_layers": choose_layers(scores, auto.layers)}


def student_init_dir(train_output_dir: str | Path) -> Path:
    """Where train builds an init_from student (and where the pipeline evaluates it before training)."""
    return Path(train_output_dir) / "student_init"


def ensure_student_init(init, folder: str | Path, dataset: str | None = None) -> Path:
    """The student of `init` (a config.train.InitFrom) in `folder`: built once, and built again when the recipe's
    init_from changed since (another teacher or other layers must not silently reuse the old student). With
    keep: auto the calibration data's content is part of that record: other data may choose other layers. A
    caller without the data (the pipeline's before-training eval) gets the folder train built."""
    from cot_distill.assets import resolve_model_path
    from cot_distill.records import content_sha256, write_json_atomic

    folder = Path(folder)
    wanted = init.model_dump(mode="json")
    if init.keep == "auto":
        if dataset is None and (folder / INIT_RECORD).exists() and (folder / "config.json").exists():
            return folder
        wanted["calibration_data"] = content_sha256(dataset) if dataset is not None else None
    record = folder / INIT_RECORD
    if (folder / "config.json").exists() and record.exists() and json.loads(record.read_text()) == wanted:
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    init_student_from_teacher(resolve_model_path(init.model), folder, keep_layers=init.keep_layers,
                              every=init.every, auto=init if init.keep == "auto" else None,
                              dataset=dataset)  # offline asset names (smollm2-135m) as well as folders
    write_json_atomic(record, wanted)  # last: a half-built folder has no record and is rebuilt
    return folder
