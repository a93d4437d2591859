"""What the ``distcomp`` commands show on the console besides their own output: log lines on stderr."""

from __future__ import annotations

import logging
import sys


def console_logging(name: str = "distcomp", tag: str = "distcomp", propagate: bool = True) -> None:
    """Show logger ``name``'s INFO messages on stderr as ``[tag] message`` (once: a second call adds nothing)."""
    log = logging.getLogger(name)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"[{tag}] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = propagate
