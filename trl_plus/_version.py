"""The version of trl-plus (the same as ``pyproject.toml``'s)."""

__version__ = "0.2.0"
