"""The outside: everything that decides."""

from sandbox import __version__

__all__ = ["__version__"]
