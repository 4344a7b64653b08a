"""Splitting a completion into its reasoning and its final answer text.

One rule, used by generate (capture), curate (completeness) and eval (strip before grading): the reasoning is
the `<think>...</think>` block, or everything before a lone `</think>` (R1-style templates open the block in
the prompt). An opened block that never closes is *unclosed*: the whole text is reasoning and there is no answer.
"""

from __future__ import annotations

from typing import NamedTuple

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


class SplitText(NamedTuple):
    reasoning: str | None  # None: the completion has no reasoning block at all
    answer: str            # the text after the reasoning block; "" when the block never closed
    closed: bool           # False only when a block was opened and not closed


def split_reasoning(text: str) -> SplitText:
    close = text.rfind(THINK_CLOSE)
    if close != -1:
        head = text[:close]
        open_at = head.find(THINK_OPEN)
        reasoning = head[open_at + len(THINK_OPEN):] if open_at != -1 else head
        return SplitText(reasoning.strip(), text[close + len(THINK_CLOSE):].strip(), True)
    open_at = text.find(THINK_OPEN)
    if open_at != -1:
        return SplitText(text[open_at + len(THINK_OPEN):].strip(), "", False)
    return SplitText(None, text.strip(), True)


def join_reasoning(reasoning: str | None, answer: str) -> str:
    """The inverse used when a server's reasoning parser already split the two: `<think>r</think>answer`."""
    if reasoning is None:
        return answer
    return f"{THINK_OPEN}{reasoning}{THINK_CLOSE}{answer}"
