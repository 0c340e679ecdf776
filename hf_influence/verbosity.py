"""The library's log records follow Hugging Face's verbosity switch.

Every module logs through `get_logger(__name__)`: a stdlib logger of the `hf_influence` family whose records
pass only at or above transformers' verbosity, read when the record is made. So the switches an HF user already
calls, `transformers.logging.set_verbosity_error()` (or `TRANSFORMERS_VERBOSITY=error`), silence our warnings
too, and `set_verbosity_info()` shows our stage messages. Progress bars are transformers' `tqdm`, which follows
`transformers.logging.disable_progress_bar()`.
"""

from __future__ import annotations

import logging

from transformers.utils import logging as hf_logging


class _TransformersVerbosity(logging.Filter):
    """Lets a record through when its level is at least transformers' current verbosity."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= hf_logging.get_verbosity()


_FILTER = _TransformersVerbosity()


def get_logger(name: str) -> logging.Logger:
    """The stdlib logger `name` (a module of hf_influence), filtered by transformers' verbosity."""
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    return logger
