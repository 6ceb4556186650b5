"""A child process that must not outlive its parent (a worker of `particalize serve`, a rank of a context-parallel
worker): the parent names itself in the child's environment, the child asks the kernel to kill it with its parent."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

log = logging.getLogger("particalize.supervisor")

PARENT_ENV = "_PARTICALIZE_PARENT_PID"
"""The environment variable a supervisor puts its pid in for its children."""
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Called first thing in a child worker: be SIGKILLed when the serve process dies (Linux), and exit
    now if it died before this call."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            log.warning("could not ask to die with the parent process; relying on the parent check")
    if os.getppid() != parent_pid:
        os._exit(1)
