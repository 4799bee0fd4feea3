"""Progress goes through Python's `logging`: one logger per package (`unlearn`, `raytasks`, `analysis`), each module
logging to `logging.getLogger(__name__)`. Entry points (the `unlearn` console script, `raytasks/sweep.py`,
`analysis/bench.py`) call `configure` once; a library user configures logging as they would for any library."""

from __future__ import annotations

import logging
import sys

PACKAGES = ("unlearn", "raytasks", "analysis")
_HANDLER_NAME = "unlearn-stderr"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a line is emitted (test capture and notebooks swap it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure(verbosity: int = 0) -> None:
    """Progress lines on standard error: INFO by default, DEBUG with `verbosity` > 0 (`-v`), WARNING and above with
    `verbosity` < 0 (`-q`). Idempotent: a second call replaces the handler, never doubles the lines."""
    level = logging.DEBUG if verbosity > 0 else logging.WARNING if verbosity < 0 else logging.INFO
    handler = _StderrHandler()
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
    for name in PACKAGES:
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if h.get_name() == _HANDLER_NAME]:
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False  # the lines are printed once, whatever the root logger does
