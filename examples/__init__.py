"""Bundled research targets (see tinylm/)."""
