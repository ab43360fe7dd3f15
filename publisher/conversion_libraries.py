"""Imported once, by the forkserver that forks each conversion: the libraries every conversion needs.

A conversion runs in a process of its own so that its memory goes back when it ends (publisher.convert).
A freshly spawned interpreter would import torch, coremltools and diffusers again for each component, about
4 s on 2 cores, most of a small model's conversion; the forkserver imports them once and each conversion
starts from that state. Quietly: the parent's log levels reach a conversion when it starts
(:func:`publisher.child_process.mirror_parent`), after these imports would have printed their warnings.
"""

import logging
import warnings

from publisher.child_process import LIBRARY_LOGGERS

for _name in LIBRARY_LOGGERS:
    logging.getLogger(_name).setLevel(logging.ERROR)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import coremltools  # noqa: F401
    import diffusers  # noqa: F401
    import torch  # noqa: F401
