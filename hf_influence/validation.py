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


def check_fields(config, integers: dict[str, int | None] | None = None,
                 numbers: dict[str, tuple[float | None, float | None]] | None = None,
                 optional: tuple[str, ...] = (), choices: dict[str, tuple] | None = None) -> None:
    """Refuse, in one line naming `Class.field`, a field of the wrong type or out of range, when the config is
    built (API, YAML and command line alike), instead of a raw TypeError deep in a run.

    Args:
        config: the dataclass instance.
        integers: {field: its minimum (None: any)}: must be an integer (not a bool) at least that.
        numbers: {field: (low, high)}: must be a finite number with low < value <= high (None: unbounded side).
        optional: fields that may also be None.
        choices: {field: its allowed values}, checked first.
    """
    owner = type(config).__name__
    for name, allowed in (choices or {}).items():
        if getattr(config, name) not in allowed:
            raise ValueError(f"{owner}.{name} must be one of {list(allowed)}, got {getattr(config, name)!r}")
    for name, minimum in (integers or {}).items():
        value = getattr(config, name)
        if value is None and name in optional:
            continue
        if not is_int(value) or (minimum is not None and value < minimum):
            bound = "" if minimum is None else f" >= {minimum}"
            raise ValueError(f"{owner}.{name} must be an integer{bound}{' (or None)' if name in optional else ''}, "
                             f"got {value!r}")
    for name, (low, high) in (numbers or {}).items():
        value = getattr(config, name)
        if value is None and name in optional:
            continue
        if not (is_number(value) and np.isfinite(value) and (low is None or value > low)
                and (high is None or value <= high)):
            span = f" in ({'-inf' if low is None else low}, {'inf' if high is None else high}]"
            raise ValueError(f"{owner}.{name} must be a finite number{span}, got {value!r}")
