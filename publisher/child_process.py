"""What a spawned worker takes from its parent before it imports anything heavy.

The conversion runs in a spawned process (publisher.convert). Its initializer lives here, in a module
that imports no library, because a spawned worker imports the initializer's module before running it:
were it publisher.convert, coremltools and torch would print their import-time warnings ("Failed to
load _MLModelProxy", "Torch version ... has not been tested") before the parent's log levels arrive,
and ``-q`` logs would fill with them.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import tempfile
import warnings
from typing import Any

LIBRARY_LOGGERS = ("coremltools", "torch", "transformers", "diffusers", "huggingface_hub")
_PR_SET_PDEATHSIG = 1


def mirror_parent(parent: int, levels: dict[str, int], filters: list[Any], tempdir: str | None) -> None:
    """Die with the parent, and take its library log levels, warning filters and temporary folder."""
    if sys.platform.startswith("linux"):
        # A killed publish must not leave a conversion running on, holding gigabytes: the kernel
        # kills this process when its parent dies (PR_SET_PDEATHSIG).
        ctypes.CDLL("libc.so.6").prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the request was in place
            os._exit(1)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    warnings.filters[:] = filters
    tempfile.tempdir = tempdir
