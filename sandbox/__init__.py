"""The inside: everything that isolates and measures one experiment."""

__version__ = "0.1.0"
