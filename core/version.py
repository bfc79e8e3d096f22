"""The package version: one source, read by pyproject.toml and the kernel cache keys."""

__version__ = "0.1.0"
