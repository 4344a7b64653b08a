"""generate.budget: a cap on the job's teacher tokens or cost, counted over its whole ledger (every run).

Spend is counted from the usage the server reports with each finished sample. The cap is checked as samples land:
once it is reached the queue stops handing out requests, what is in flight finishes (and is counted: a cap can be
passed by up to one window of requests), and the run fails without a manifest. A rerun with a higher cap starts
from what the ledger already holds.
"""

from __future__ import annotations

from cot_distill.config import BudgetSection


class Budget:
    def __init__(self, section: BudgetSection, prompt_tokens: int = 0, completion_tokens: int = 0):
        self.section = section
        self.prompt_tokens, self.completion_tokens = prompt_tokens, completion_tokens

    def add(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens

    def usd(self) -> float | None:
        price = self.section.price_per_mtok
        if price is None:
            return None
        return (self.prompt_tokens * price.prompt + self.completion_tokens * price.completion) / 1e6

    def reached(self) -> str | None:
        """Which cap is reached, in words, or None."""
        cap_tokens, cap_usd = self.section.max_completion_tokens, self.section.max_usd
        if cap_tokens is not None and self.completion_tokens >= cap_tokens:
            return f"generate.budget.max_completion_tokens={cap_tokens:,} ({self.completion_tokens:,} spent)"
        if cap_usd is not None and (self.usd() or 0.0) >= cap_usd:
            return f"generate.budget.max_usd={cap_usd:g} (${self.usd():.4f} spent)"
        return None

    def progress_text(self) -> str:
        usd = self.usd()
        cost = f", ${usd:,.4f}" if usd is not None else ""
        return f"spent {self.prompt_tokens + self.completion_tokens:,} tok{cost}"

    def stats(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "usd": None if self.usd() is None else round(self.usd(), 6),
                "max_completion_tokens": self.section.max_completion_tokens, "max_usd": self.section.max_usd}
