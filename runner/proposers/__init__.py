"""Proposers turn the research state into the next train.py."""

from __future__ import annotations

import os

from .base import Context, Proposal, Proposer, ProposerError, Summary

__all__ = ["Context", "Proposal", "Proposer", "ProposerError", "Summary", "make_proposer"]


def make_proposer(cfg, repo) -> Proposer:
    """The configured proposer; 'auto' is Claude when ANTHROPIC_API_KEY is set, else offline."""
    kind = cfg.proposer
    if kind == "auto":
        kind = "claude" if os.environ.get("ANTHROPIC_API_KEY") else "offline"
    if kind == "claude":
        from .claude import ClaudeProposer

        return ClaudeProposer(model=cfg.model, max_tokens=cfg.max_tokens, max_retries=cfg.api_retries,
                              max_turns=cfg.max_turns)
    from .offline import OfflineProposer

    return OfflineProposer(seed=cfg.seed)
