"""What a converting process takes from its parent when it starts.

The conversion runs in a process of its own (publisher.convert), forked from a forkserver on Linux and
spawned elsewhere. Its initializer lives here, in a module that imports no heavy library, because a
spawned worker imports the initializer's module before running it: were it publisher.convert,
coremltools and torch would print their import-time warnings ("Failed to load _MLModelProxy", "Torch
version ... has not been tested") before the parent's log levels arrive, and ``-q`` logs would fill with
them.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import sys
import tempfile
import threading
import warnings
from typing import Any

LIBRARY_LOGGERS = ("coremltools", "torch", "transformers", "diffusers", "huggingface_hub")


def mirror_parent(parent: int, levels: dict[str, int], filters: list[Any], tempdir: str | None) -> None:
    """Die with the publishing process ``parent``, and take its library log levels, warning filters and
    temporary folder."""
    if sys.platform.startswith("linux"):
        _die_with(parent)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    warnings.filters[:] = filters
    tempfile.tempdir = tempdir


def _die_with(parent: int) -> None:
    """A killed publish must not leave a conversion running on, holding gigabytes.

    The kernel's death signal (PR_SET_PDEATHSIG) follows the process that forked this one: the
    forkserver, which exits when the publish does only once every process holding its lifeline has
    ended, this one included. So this process watches the publish itself, through a pidfd that becomes
    readable when it exits (Linux 5.3; on older kernels a conversion runs to its end).
    """
    try:
        publish = os.pidfd_open(parent)
    except ProcessLookupError:  # gone before the watch was in place
        os._exit(1)
    except OSError:
        return

    def watch() -> None:
        select.select([publish], [], [])
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="die-with-publish", daemon=True).start()
