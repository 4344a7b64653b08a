"""Which teacher layers a pruned student keeps, by measured importance (init_from: {keep: auto, layers: N}).

Two scores per decoder layer, measured on calibration rows (the first `calibration_rows` curated conversations,
rendered with the teacher's chat template):

- block_importance (Minitron, Muralidharan et al. 2024): 1 - the mean cosine similarity between the hidden state
  entering the layer and the one leaving it, over every token. A layer that barely turns its input matters little.
  One forward pass.
- skip_loss: the increase of the mean next-token loss over every token when the layer alone is skipped (its output
  replaced by its input). One forward pass per layer; closer to what pruning does, and that much slower.

The N layers with the highest score are kept, in their original order (ties: the lower index). Everything is
deterministic: the rows are the file's first ones, the models run in eval mode in float32, no sampling.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F

SCORES = ("block_importance", "skip_loss")


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder's layer list (Llama / Qwen / Mistral keep it at model.model.layers)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(model).__name__} keeps no decoder layers at model.layers: keep: auto supports "
                         f"Llama/Qwen-style decoders")
    return layers


def calibration_batches(tokenizer, conversations: list[list[dict]], max_length: int,
                        batch_size: int = 8) -> list[dict[str, torch.Tensor]]:
    """The conversations rendered with the chat template, tokenized, right-padded into batches."""
    texts = [tokenizer.apply_chat_template(messages, tokenize=False) for messages in conversations]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = []
    for start in range(0, len(texts), batch_size):
        encoded = [tokenizer(text, add_special_tokens=False)["input_ids"][:max_length]
                   for text in texts[start:start + batch_size]]
        width = max(len(ids) for ids in encoded)
        batches.append({
            "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids in encoded]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in encoded]),
        })
    return batches


def _hidden_in(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden_out(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def block_importance(model, batches: list[dict[str, torch.Tensor]]) -> list[float]:
    layers = decoder_layers(model)
    sums = [0.0] * len(layers)
    tokens = 0
    current_mask: list[torch.Tensor] = []

    def watch(index: int):
        def hook(module, args, kwargs, output):
            mask = current_mask[0]
            similarity = F.cosine_similarity(_hidden_in(args, kwargs).float(), _hidden_out(output).float(), dim=-1)
            sums[index] += float((1 - similarity)[mask].sum())
        return hook

    handles = [layer.register_forward_hook(watch(index), with_kwargs=True) for index, layer in enumerate(layers)]
    try:
        for batch in batches:
            current_mask[:] = [batch["attention_mask"].bool()]
            tokens += int(batch["attention_mask"].sum())
            model(**batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [value / max(tokens, 1) for value in sums]


def _mean_loss(model, batches: list[dict[str, torch.Tensor]]) -> float:
    total, count = 0.0, 0
    for batch in batches:
        logits = model(**batch, use_cache=False).logits[:, :-1].float()
        targets = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                       ignore_index=-100, reduction="sum"))
        count += int((targets != -100).sum())
    return total / max(count, 1)


@contextlib.contextmanager
def skipped(layer: torch.nn.Module) -> Iterator[None]:
    """The layer's output replaced by its input while inside."""

    def identity(module, args, kwargs, output):
        hidden = _hidden_in(args, kwargs)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = layer.register_forward_hook(identity, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def skip_loss(model, batches: list[dict[str, torch.Tensor]]) -> list[float]:
    baseline = _mean_loss(model, batches)
    increases = []
    for layer in decoder_layers(model):
        with skipped(layer):
            increases.append(_mean_loss(model, batches) - baseline)
    return increases


def score_layers(model, batches: list[dict[str, torch.Tensor]], score: str) -> list[float]:
    model.eval()
    return block_importance(model, batches) if score == "block_importance" else skip_loss(model, batches)


def choose_layers(scores: list[float], keep: int) -> list[int]:
    """The `keep` highest-scoring layer indices, in layer order; ties go to the lower index."""
    if not 0 < keep <= len(scores):
        raise ValueError(f"init_from.layers must be between 1 and the teacher's {len(scores)} layers, got {keep}")
    ranked = sorted(range(len(scores)), key=lambda index: (-scores[index], index))
    return sorted(ranked[:keep])
