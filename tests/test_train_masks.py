"""Assistant-only loss masks on the real Qwen3 tokenizer: exactly the reply plus its stop token, or a loud error."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_train_support import qwen3_tokenizer, toy_conversation  # noqa: E402

from cot_distill.config.train import TrainSection  # noqa: E402
from cot_distill.train import (  # noqa: E402
    CHATML_TEMPLATE,
    IGNORE,
    ChatTemplateError,
    encode_conversation,
    find_end_of_turn,
    normalize_messages,
    resolve_chat_template,
    tokenize_conversations,
)

REPLY = "<think>\nadd 3 and 4\n</think>\n\nThe answer is \\boxed{7}"


def section(**overrides) -> TrainSection:
    return TrainSection(student="unused", output_dir="unused", **overrides)


def encode(tokenizer, messages, **overrides):
    cfg = section(**overrides)
    template, _ = resolve_chat_template(tokenizer, cfg)
    end_of_turn = find_end_of_turn(tokenizer, template, cfg.assistant_mask)
    normalized, _ = normalize_messages(messages, cfg.reasoning_format)
    ids, labels, _ = encode_conversation(tokenizer, template, normalized, cfg.assistant_mask, end_of_turn)
    return ids, labels, end_of_turn


def assert_mask_is_exactly_the_reply(tokenizer, ids, labels):
    expected_reply = tokenizer(REPLY + "<|im_end|>", add_special_tokens=False)["input_ids"]
    trained = [label for label in labels if label != IGNORE]
    assert trained == expected_reply  # the whole reply, reasoning included, and the stop token, nothing else
    first = labels.index(expected_reply[0])
    assert all(label == IGNORE for label in labels[:first])  # the prompt carries no loss
    assert labels[first:first + len(expected_reply)] == ids[first:first + len(expected_reply)]
    assert tokenizer.decode(ids[:first]) == "<|im_start|>user\nWhat is 3+4?<|im_end|>\n<|im_start|>assistant\n"
    assert trained[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_final_turn_mask_covers_exactly_the_reply_and_its_stop_token():
    tokenizer = qwen3_tokenizer()
    ids, labels, end_of_turn = encode(tokenizer, toy_conversation(3, 4))
    assert end_of_turn == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert_mask_is_exactly_the_reply(tokenizer, ids, labels)
    # The template writes "\n" after <|im_end|>; the student stops before it, so it is not trained (nor kept).
    assert ids[-1] == end_of_turn


def test_prompt_tokens_match_what_inference_feeds_the_model():
    tokenizer = qwen3_tokenizer()
    ids, labels, _ = encode(tokenizer, toy_conversation(3, 4))
    prompt = tokenizer.apply_chat_template(toy_conversation(3, 4)[:1], add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids[:len(prompt_ids)] == prompt_ids and labels[len(prompt_ids)] != IGNORE


def test_reasoning_content_rows_render_like_think_tag_rows():
    tokenizer = qwen3_tokenizer()
    split = [{"role": "user", "content": "What is 3+4?"},
             {"role": "assistant", "content": "The answer is \\boxed{7}", "reasoning_content": "add 3 and 4"}]
    for reasoning_format in ("think_tags", "reasoning_content"):
        ids, labels, _ = encode(tokenizer, split, reasoning_format=reasoning_format)
        assert_mask_is_exactly_the_reply(tokenizer, ids, labels)
        assert (ids, labels) == encode(tokenizer, toy_conversation(3, 4), reasoning_format=reasoning_format)[:2]


def test_template_without_generation_markers_fails_loudly():
    # The shipped Qwen3 template has no {% generation %}: transformers would only warn and mask nothing.
    tokenizer = qwen3_tokenizer()
    with pytest.raises(ChatTemplateError, match="generation"):
        encode(tokenizer, toy_conversation(3, 4), assistant_mask="generation_markers")


def test_generation_markers_from_trls_training_template(tmp_path):
    import trl

    template = Path(trl.__file__).parent / "chat_templates" / "qwen3_training.jinja"
    tokenizer = qwen3_tokenizer()
    ids, labels, _ = encode(tokenizer, toy_conversation(3, 4), assistant_mask="generation_markers",
                            chat_template=str(template))
    # TRL's block ends with "<|im_end|>\n"; the trailing newline is cut from the loss.
    assert_mask_is_exactly_the_reply(tokenizer, ids, labels)
    assert labels[-1] == IGNORE and tokenizer.decode(ids[-1:]) == "\n"


def test_generation_markers_that_leave_out_the_stop_token_fail(tmp_path):
    leaky = CHATML_TEMPLATE.replace("{{- message.content + '<|im_end|>' }}{%- endgeneration %}",
                                    "{{- message.content }}{%- endgeneration %}{{- '<|im_end|>' }}")
    assert leaky != CHATML_TEMPLATE
    path = tmp_path / "leaky.jinja"
    path.write_text(leaky)
    with pytest.raises(ChatTemplateError, match="never be trained to stop"):
        encode(qwen3_tokenizer(), toy_conversation(3, 4), assistant_mask="generation_markers", chat_template=str(path))


def test_student_without_template_gets_chatml_with_markers():
    tokenizer = qwen3_tokenizer()
    bare = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    bare.chat_template = None
    for mode in ("final_turn", "generation_markers"):
        template, saved = resolve_chat_template(bare, section(assistant_mask=mode))
        assert template == saved == CHATML_TEMPLATE
        ids, labels, _ = encode(bare, toy_conversation(3, 4), assistant_mask=mode)
        assert_mask_is_exactly_the_reply(bare, ids, labels)


def test_template_that_drops_the_reasoning_fails(tmp_path):
    # DeepSeek-R1-style templates strip everything up to </think> from assistant turns.
    stripping = CHATML_TEMPLATE.replace("{{- message.content + '<|im_end|>' }}",
                                        "{{- message.content.split('</think>')[-1] + '<|im_end|>' }}")
    path = tmp_path / "strip.jinja"
    path.write_text(stripping)
    from datasets import Dataset

    rows = Dataset.from_list([{"messages": toy_conversation(3, 4)}])
    cfg = section(chat_template=str(path))
    tokenizer = qwen3_tokenizer()
    with pytest.raises(ChatTemplateError, match="dropped the reasoning"):
        tokenize_conversations(rows, tokenizer, stripping, cfg, find_end_of_turn(tokenizer, stripping, "final_turn"),
                               None, None)


def test_overlong_rows_are_dropped_or_truncated():
    from datasets import Dataset

    tokenizer = qwen3_tokenizer()
    template = tokenizer.chat_template
    end_of_turn = find_end_of_turn(tokenizer, template, "final_turn")
    long_reply = [{"role": "user", "content": "Go"}, {"role": "assistant", "content": "word " * 300}]
    rows = Dataset.from_list([{"messages": toy_conversation(3, 4)}, {"messages": long_reply}])
    dropped = tokenize_conversations(rows, tokenizer, template, section(), end_of_turn, 64, None)
    assert len(dropped) == 1
    truncated = tokenize_conversations(rows, tokenizer, template, section(overlong="truncate"), end_of_turn, 64, None)
    assert [len(ids) for ids in truncated["input_ids"]][1] == 64


def test_curated_dataset_formats_load_alike(tmp_path):
    import json

    from datasets import Dataset

    from cot_distill.train import load_conversations

    rows = [{"messages": toy_conversation(a, b), "prompt_id": f"p{a}"} for a, b in [(3, 4), (2, 5)]]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "rows.json").write_text(json.dumps(rows, indent=1))
    Dataset.from_list(rows).to_parquet(str(tmp_path / "rows.parquet"))
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for name in ("rows.jsonl", "rows.json", "rows.parquet", "saved"):
        assert load_conversations(str(tmp_path / name))["messages"] == [row["messages"] for row in rows], name
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "no messages"}) + "\n")
    with pytest.raises(ValueError, match="messages"):
        load_conversations(str(tmp_path / "bad.jsonl"))
