"""Shared builders for the train tests (no tests here): a Qwen3-shaped small tokenizer, tiny students, toy data.

The real Qwen3 tokenizer has 151,669 tokens, which makes a tiny model's LM head dominate every CPU step. The small
tokenizer is the same tokenizer retrained to ~300 tokens: same pipeline, same added tokens (<|im_start|>,
<|im_end|>, <think>), same chat template, so masking and stopping behave as with the real one.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

TOY_PROBLEMS = [(3, 4), (2, 5), (6, 1), (8, 9)]


def toy_conversation(a: int, b: int) -> list[dict]:
    return [
        {"role": "user", "content": f"What is {a}+{b}?"},
        {"role": "assistant", "content": f"<think>\nadd {a} and {b}\n</think>\n\nThe answer is \\boxed{{{a + b}}}"},
    ]


@functools.lru_cache(maxsize=1)
def qwen3_tokenizer():
    from transformers import AutoTokenizer

    from cot_distill.assets import qwen3_tokenizer_dir

    return AutoTokenizer.from_pretrained(qwen3_tokenizer_dir())


@functools.lru_cache(maxsize=1)
def small_tokenizer_dir() -> Path:
    corpus = [json.dumps(toy_conversation(a, b)) for a, b in TOY_PROBLEMS] * 4 + ["abcdefghijklmnopqrstuvwxyz 0123456789"]
    small = qwen3_tokenizer().train_new_from_iterator(corpus, vocab_size=320)
    folder = Path(tempfile.mkdtemp(prefix="cot_distill_small_tok_"))
    small.save_pretrained(folder)
    return folder


def make_tiny_student(folder: Path, family: str = "qwen3", layers: int = 2, hidden: int = 64, seed: int = 0,
                      tokenizer_dir: Path | None = None, tied: bool = False, dtype: str = "float32") -> Path:
    """A random tiny decoder of the given family with the small (or given) tokenizer, saved to folder."""
    import torch
    from transformers import (
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or small_tokenizer_dir())
    classes = {"qwen3": (Qwen3Config, Qwen3ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM),
               "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    config_class, model_class = classes[family]
    config = config_class(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=hidden // 4, max_position_embeddings=1024, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model_class(config).to(getattr(torch, dtype)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_toy_dataset(path: Path, copies: int = 8, problems=TOY_PROBLEMS[:2]) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for index in range(copies * len(problems)):
            a, b = problems[index % len(problems)]
            row = {"messages": toy_conversation(a, b), "reasoning": f"add {a} and {b}", "prompt_id": f"p{index}",
                   "source": "toy", "teacher": "toy", "grade": "correct"}
            handle.write(json.dumps(row) + "\n")
    return path
