"""What a night spends on the proposer's model: tokens as the API counted them (each proposal's
`usage`), priced with the one price table (RunConfig.prices, DEFAULT_PRICES_PER_MTOK in
config.py). The loop, `runner status` and the report all count it here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

TOKENS_PER_MTOK = 1_000_000


def price_per_mtok(model: str | None, prices: dict) -> tuple[float, float] | None:
    """(USD per million input tokens, USD per million output tokens) for `model`: the entry of
    `prices` whose name is the longest prefix of it; None when none is."""
    if not model:
        return None
    names = [name for name in prices if model.startswith(name)]
    if not names:
        return None
    try:
        per_in, per_out = prices[max(names, key=len)]
        return float(per_in), float(per_out)
    except (TypeError, ValueError):  # a price table recorded by another version, or damaged
        return None


def _count(value) -> int:
    """A token count from a record written by another version (or damaged): 0 unless a number."""
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


@dataclass
class Spend:
    """Tokens the model used, as its API reported them."""

    input_tokens: int = 0
    output_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def add(self, usage) -> None:
        """Count one `usage` record ({"input_tokens": N, "output_tokens": M, ...}; anything else counts 0)."""
        if isinstance(usage, dict):
            self.input_tokens += _count(usage.get("input_tokens"))
            self.output_tokens += _count(usage.get("output_tokens"))

    def cost_usd(self, model: str | None, prices: dict) -> float | None:
        """What the tokens cost with `model`'s price, or None when `prices` has none for it."""
        price = price_per_mtok(model, prices)
        if price is None:
            return None
        return (self.input_tokens * price[0] + self.output_tokens * price[1]) / TOKENS_PER_MTOK


def spent(events: Iterable) -> Spend:
    """The spend a tag's events.jsonl records (Ledger.read(), records.Event): every event that
    carries a model `usage` (experiments, refused and dropped proposals, the summaries), over all
    its sessions."""
    spend = Spend()
    for event in events:
        spend.add(getattr(event, "usage", None))
    return spend


def describe(spend: Spend, model: str | None, prices: dict, max_cost_usd: float | None = None,
             max_total_tokens: int | None = None, hours: float | None = None, max_hours: float | None = None) -> str:
    """One line for the live panel and `runner status`: spend and time, each against its cap when set."""
    cost = spend.cost_usd(model, prices)
    parts = []
    if cost is not None:
        parts.append(f"${cost:.2f}" + ("" if max_cost_usd is None else f" of ${max_cost_usd:.2f}"))
    parts.append(f"{spend.total_tokens / TOKENS_PER_MTOK:.2f}M tokens"
                 + ("" if max_total_tokens is None else f" of {max_total_tokens / TOKENS_PER_MTOK:.2f}M"))
    if hours is not None:
        parts.append(f"{hours:.1f} h" + ("" if max_hours is None else f" of {max_hours:g} h"))
    return ", ".join(parts)
