"""``prctl(2)``: the few Linux process settings that keep a job's processes from outliving it."""

from __future__ import annotations

import ctypes
import os

PR_SET_PDEATHSIG = 1
"""Deliver a signal to this process when its parent dies."""
PR_SET_NAME = 15
"""This thread's name in ps, top and ``/proc/PID/comm`` (15 bytes at most)."""
PR_SET_CHILD_SUBREAPER = 36
"""Adopt orphaned descendants instead of letting init adopt them."""


def prctl(option: int, value: int | bytes) -> None:
    """Call ``prctl(option, value)``; an :class:`OSError` where it fails or the C library has none (not Linux)."""
    try:
        call = ctypes.CDLL(None, use_errno=True).prctl
    except AttributeError:
        raise OSError(f"prctl is not available here ({os.uname().sysname})") from None
    if call(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
