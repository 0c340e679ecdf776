"""Type checks for option and column values: the config dataclasses and the trainer refuse a value of the wrong
type when they are built, with a message naming the field, instead of a raw TypeError deep in a run."""

from __future__ import annotations

import numpy as np


def is_int(value) -> bool:
    """A Python or NumPy integer, not a bool (YAML's `true` must not pass as 1)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A Python or NumPy int or float, not a bool (may be nan or inf: callers that need finite check that)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
