"""Loading a diffusers pipeline while collecting every warning and warning log record it emits."""

from __future__ import annotations

import logging
from pathlib import Path


class DiffusersLog(logging.Handler):
    """Collects diffusers' log records (its loggers do not propagate to the root logger)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def load_quietly(folder: Path):
    """``DiffusionPipeline.from_pretrained(folder)``, asserting that it neither warns nor logs a warning."""
    import warnings

    from diffusers import DiffusionPipeline

    handler, logger = DiffusersLog(), logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe = DiffusionPipeline.from_pretrained(folder)
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in handler.records] == []
    assert [str(w.message) for w in caught] == []
    return pipe
