"""The one exception the benchmark folder loaders raise for bad data on disk."""
from __future__ import annotations


class DatasetError(ValueError):
    """A benchmark folder is missing, malformed or inconsistent; the message names the file, line and fix."""
