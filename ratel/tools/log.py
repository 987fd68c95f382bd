"""Ratel's log output: every module logs to a child of the ``ratel`` logger; one variable sets the level.

    RATEL_LOG=debug python train.py     # pass timings, plans, runtime decisions
    RATEL_LOG=info                      # one line per plan made
    RATEL_LOG=warning                   # problems only (the default when unset)

Set, it gives the ``ratel`` logger that level and one stderr handler of its own (records then stop at
``ratel``, so an application's root handler does not print them twice). Unset, Ratel configures nothing and
an application's own ``logging`` setup decides, as it should for a library. ``configure`` runs once at
``import ratel``; calling it again (with a level, or after changing the variable) reconfigures, never
stacking handlers.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings

ENV = "RATEL_LOG"
LOGGER = "ratel"
_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "warn": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}


class _RatelHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (as logging's last-resort handler does),
    so redirected or captured stderr receives it; its type marks the handler this module installed, so
    reconfiguring replaces it instead of adding another."""

    def __init__(self):
        logging.Handler.__init__(self)

    @property
    def stream(self):
        return sys.stderr


def parse_level(value: str | int) -> int:
    """``debug``/``info``/``warning``/``error``/``critical`` (any case) or a number -> a logging level."""
    if isinstance(value, int):
        return value
    text = value.strip().lower()
    if text in _LEVELS:
        return _LEVELS[text]
    if text.isdigit():
        return int(text)
    raise ValueError(f"{ENV}={value!r}: use one of {', '.join(k for k in _LEVELS if k != 'warn')}")


def configure(level: str | int | None = None) -> logging.Logger:
    """Apply ``level`` (default: ``$RATEL_LOG``) to the ``ratel`` logger; with neither, leave logging alone."""
    logger = logging.getLogger(LOGGER)
    if level is None:
        level = os.environ.get(ENV, "").strip() or None
    if level is None:
        return logger
    try:
        parsed = parse_level(level)
    except ValueError as exc:
        # A typo in an environment variable must not stop training; say so once and keep the default.
        warnings.warn(str(exc), stacklevel=2)
        return logger
    for handler in [h for h in logger.handlers if isinstance(h, _RatelHandler)]:
        logger.removeHandler(handler)
    handler = _RatelHandler()
    handler.setFormatter(logging.Formatter(_FORMAT))
    logger.addHandler(handler)
    logger.setLevel(parsed)
    logger.propagate = False
    return logger


__all__ = ["ENV", "configure", "parse_level"]
