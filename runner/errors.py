"""Errors several runner modules raise, in a module that imports none of them: config.py checks
entries with the parsers of hub.py and heldout.py, which raise ConfigError themselves."""

from __future__ import annotations


class ConfigError(ValueError):
    """runner.yaml or an option is invalid; the message names the key."""
