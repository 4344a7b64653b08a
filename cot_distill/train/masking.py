"""Chat-template masking: curated `messages` rows -> token ids with labels on exactly the assistant's reply.

Why the tokenization is ours and not TRL's `assistant_only_loss`: with a template lacking `{% generation %}` markers
transformers only *warns* and returns an all-zero mask, and templates that have markers often leave the end-of-turn
token outside them, so the student never learns to stop. Here every example's labels cover exactly the assistant's
tokens through the stop token, and anything else is a ChatTemplateError before training starts.
"""

from __future__ import annotations

from pathlib import Path

from trl.chat_template_utils import get_training_chat_template, has_generation_markers

from cot_distill.config.train import TrainSection
from cot_distill.errors import UserError
from cot_distill.reasoning import THINK_CLOSE, THINK_OPEN, split_reasoning
from cot_distill.records import iter_jsonl, read_json

IGNORE = -100


CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


# For students without a template of their own. Generation markers wrap the reply and its <|im_end|>, so it also
# serves assistant_mask: generation_markers.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}"
    "{%- if message.reasoning_content is string %}"
    "{{- '<think>\\n' + message.reasoning_content.strip('\\n') + '\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{{- message.content + '<|im_end|>' }}"
    "{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


_PROBE = [{"role": "user", "content": "Probe question?"}, {"role": "assistant", "content": "Probe answer."}]


class TrainError(UserError, ValueError):
    """Training inputs that cannot be used as given: the dataset, the student, the teacher."""


class ChatTemplateError(TrainError):
    """The chat template cannot produce a correct assistant-only loss mask."""


def load_conversations(path: str):
    """A curated dataset as a datasets.Dataset: a save_to_disk folder, or a .jsonl/.json/.parquet file."""
    from datasets import Dataset, DatasetDict, load_from_disk

    source = Path(path)
    if not source.exists():
        raise TrainError(f"training data {path} does not exist: run `cot-distill curate` first, or set train.dataset")
    if source.is_dir():
        dataset = load_from_disk(str(source))
        dataset = dataset["train"] if isinstance(dataset, DatasetDict) else dataset
    elif source.suffix in (".jsonl", ".json"):
        with open(source, "rb") as handle:
            is_array = handle.read(256).lstrip()[:1] == b"["
        dataset = Dataset.from_list(read_json(source) if is_array else [row for _, row in iter_jsonl(source)])
    elif source.suffix == ".parquet":
        import pyarrow.parquet as pq

        dataset = Dataset.from_list(pq.read_table(source).to_pylist())
    else:
        raise TrainError(f"{path}: expected a save_to_disk folder or a .jsonl/.json/.parquet file")
    if "messages" not in dataset.column_names:
        raise TrainError(f"{path}: no `messages` column (columns: {dataset.column_names})")
    return dataset


def normalize_messages(messages: list[dict], reasoning_format: str) -> tuple[list[dict], str | None]:
    """Put each assistant turn's reasoning in the form the template expects. Returns the messages and the final
    turn's reasoning, which must survive rendering (some templates silently strip <think> blocks)."""
    normalized, final_reasoning = [], None
    for message in messages:
        message = {key: value for key, value in message.items() if value is not None}  # Arrow fills absent keys
        if message.get("role") == "assistant":
            content = message.get("content") or ""
            reasoning = message.pop("reasoning_content", None)
            if reasoning is None and THINK_CLOSE in content:
                reasoning, content = split_reasoning(content)[:2]
            final_reasoning = reasoning.strip() if reasoning and reasoning.strip() else None
            if final_reasoning is None:
                message["content"] = content
            elif reasoning_format == "think_tags":
                message["content"] = f"{THINK_OPEN}\n{final_reasoning}\n{THINK_CLOSE}\n\n{content.lstrip()}"
            else:
                message["content"], message["reasoning_content"] = content.lstrip(), final_reasoning
        normalized.append(message)
    return normalized, final_reasoning


def resolve_chat_template(tokenizer, cfg: TrainSection) -> tuple[str, str]:
    """(template to train with, template to save with the model). The saved one is the student's own when it has
    one, so that inference renders prompts exactly as the student's users and servers expect."""
    own = tokenizer.chat_template["default"] if isinstance(tokenizer.chat_template, dict) else tokenizer.chat_template
    if cfg.chat_template:
        chosen = Path(cfg.chat_template).read_text(encoding="utf-8")
        return chosen, chosen
    if own is None:
        return CHATML_TEMPLATE, CHATML_TEMPLATE
    if cfg.assistant_mask == "final_turn" or has_generation_markers(own):
        return own, own
    try:
        training = get_training_chat_template(tokenizer)
    except ValueError:
        training = None
    if training is None:
        raise ChatTemplateError(
            "assistant_mask: generation_markers needs {% generation %} markers, and the student's chat template has "
            "none (nor does TRL ship a training variant of it). transformers would only warn and return an all-zero "
            "mask. Use assistant_mask: final_turn (works with any template), or set train.chat_template to a copy of "
            "the template with {% generation %}...{% endgeneration %} around each reply and its end-of-turn token."
        )
    return training, own


def _render(tokenizer, template: str, messages: list[dict], **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)


def _encode(tokenizer, text: str) -> list[int]:
    # Templates write their own BOS; add_special_tokens would double it (vLLM tokenizes chat prompts the same way).
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _is_blank(tokenizer, token_id: int) -> bool:
    return tokenizer.decode([token_id]).strip() == ""


def _strip_trailing_blanks(tokenizer, ids: list[int], end: int, stop_id: int) -> int:
    """Where a turn really ends: drop whitespace the template writes after its stop token (Qwen's '\\n' after
    <|im_end|>), which the model never generates because it stopped."""
    while end > 0 and ids[end - 1] != stop_id and _is_blank(tokenizer, ids[end - 1]):
        end -= 1
    return end


def _final_turn_split(tokenizer, template: str, messages: list[dict]) -> tuple[str, str]:
    """(prompt text as rendered for inference, text the model must generate after it)."""
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("the last message of a training conversation must be the assistant's")
    prompt = _render(tokenizer, template, messages[:-1], add_generation_prompt=True)
    full = _render(tokenizer, template, messages)
    if not full.startswith(prompt):
        at = next((i for i, (a, b) in enumerate(zip(prompt, full)) if a != b), len(prompt))
        raise ChatTemplateError(
            f"the template renders the prompt differently once the reply follows (first difference at char {at}: "
            f"{prompt[at:at + 40]!r} vs {full[at:at + 40]!r}); training would not match inference"
        )
    return prompt, full[len(prompt):]


def find_end_of_turn(tokenizer, template: str, assistant_mask: str) -> int:
    """The token that ends an assistant turn under this template, found by rendering a probe conversation: the last
    non-blank token of the reply when it is a special/added token, else the tokenizer's EOS (then appended)."""
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    if assistant_mask == "generation_markers":
        rendered = tokenizer.apply_chat_template(
            _PROBE, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        reply = [t for t, m in zip(rendered["input_ids"], rendered["assistant_masks"]) if m]
        if not reply:
            raise ChatTemplateError("the template's {% generation %} markers mark no assistant token")
    else:
        reply = _encode(tokenizer, _final_turn_split(tokenizer, template, _PROBE)[1])
    last = next((t for t in reversed(reply) if not _is_blank(tokenizer, t)), None)
    if last in special:
        return last
    if assistant_mask == "generation_markers":
        raise ChatTemplateError(
            "the template's {% generation %} block ends on content, not on an end-of-turn token: the student would "
            "never be trained to stop. Move {% endgeneration %} after the end-of-turn token."
        )
    if tokenizer.eos_token_id is None:
        raise ChatTemplateError("the template leaves the assistant turn open and the tokenizer has no EOS token")
    return tokenizer.eos_token_id


def encode_conversation(tokenizer, template: str, messages: list[dict], assistant_mask: str,
                        end_of_turn: int) -> tuple[list[int], list[int], str]:
    """(input_ids, labels, rendered text): labels are the token ids on assistant tokens through the stop token and
    IGNORE everywhere else."""
    if assistant_mask == "final_turn":
        prompt, reply = _final_turn_split(tokenizer, template, messages)
        prompt_ids, reply_ids = _encode(tokenizer, prompt), _encode(tokenizer, reply)
        reply_ids = reply_ids[: _strip_trailing_blanks(tokenizer, reply_ids, len(reply_ids), end_of_turn)]
        if not reply_ids or reply_ids[-1] != end_of_turn:
            reply_ids.append(end_of_turn)  # the template leaves the final turn open: the student must still stop
        return prompt_ids + reply_ids, [IGNORE] * len(prompt_ids) + reply_ids, reply
    rendered = tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = list(rendered["input_ids"]), list(rendered["assistant_masks"])
    labels = [token if masked else IGNORE for token, masked in zip(ids, mask)]
    span_ends = [i + 1 for i in range(len(mask)) if mask[i] and (i + 1 == len(mask) or not mask[i + 1])]
    for end in span_ends:
        real_end = _strip_trailing_blanks(tokenizer, ids, end, end_of_turn)
        labels[real_end:end] = [IGNORE] * (end - real_end)
        if real_end == 0 or ids[real_end - 1] != end_of_turn:
            raise ChatTemplateError("an assistant span of the template does not end with its end-of-turn token")
    if not span_ends:
        raise ChatTemplateError("the template's {% generation %} markers mark no assistant token in a conversation")
    return ids, labels, _render(tokenizer, template, messages)


def encode_recorded_conversation(tokenizer, template: str, row: dict, index: int,
                                 reply_from_record) -> tuple[list[int], list[int], dict]:
    """(input_ids, labels, extra columns) of a row whose reply is the teacher's recorded tokens: the prompt as
    inference renders it, then reply_from_record(row, index)'s ids, all of them labels."""
    messages = normalize_messages(row["messages"][:-1], "think_tags")[0]  # only the prompt turns: Arrow's Nones
    prompt_ids = _encode(tokenizer, _render(tokenizer, template, messages, add_generation_prompt=True))
    reply_ids, extra = reply_from_record(row, index)
    return prompt_ids + reply_ids, [IGNORE] * len(prompt_ids) + reply_ids, extra


def tokenize_conversations(dataset, tokenizer, template: str, cfg: TrainSection, end_of_turn: int,
                           max_length: int | None, num_proc: int | None, reply_from_record=None):
    """Dataset of messages -> Dataset of input_ids/labels (+ length), overlong rows dropped or truncated.
    `reply_from_record(row, index) -> (reply ids, extra columns)`: the final reply is those ids instead of the
    tokenized text (kd.teacher: recorded, train/recorded.py), and the extra columns are kept."""

    def encode_row(row: dict, index: int) -> dict:
        if reply_from_record is not None:
            ids, labels, extra = encode_recorded_conversation(tokenizer, template, row, index, reply_from_record)
            if cfg.overlong == "truncate" and max_length is not None:
                ids, labels = ids[:max_length], labels[:max_length]
            return {"input_ids": ids, "labels": labels, "length": len(ids), **extra}
        messages, reasoning = normalize_messages(row["messages"], cfg.reasoning_format)
        try:
            ids, labels, rendered = encode_conversation(tokenizer, template, messages, cfg.assistant_mask,
                                                        end_of_turn)
        except ValueError as error:
            raise type(error)(f"row {index}: {error}") from error
        if reasoning and reasoning[:64] not in rendered:
            raise ChatTemplateError(
                f"row {index}: the chat template dropped the reasoning of the final reply (some templates strip "
                f"<think> blocks); try train.reasoning_format: reasoning_content or a train.chat_template that keeps it"
            )
        if cfg.overlong == "truncate" and max_length is not None:
            ids, labels = ids[:max_length], labels[:max_length]
        return {"input_ids": ids, "labels": labels, "length": len(ids)}

    tokenized = dataset.map(encode_row, with_indices=True, remove_columns=dataset.column_names,
                            keep_in_memory=True, num_proc=num_proc, desc="Tokenizing conversations")
    if cfg.overlong == "drop" and max_length is not None:
        tokenized = tokenized.filter(lambda length: length <= max_length, input_columns="length", keep_in_memory=True)
    return tokenized.remove_columns("length")
