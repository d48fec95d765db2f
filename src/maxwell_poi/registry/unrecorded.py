"""Forward passes that no activation recorder may keep: the work probe's (prover.probe).

A resident agent answers Maxwell's probe on its own thread while a lease generates on another,
through the same module and so through the same forward hooks. Every recorder (activations,
traces, W8A8 taps) asks `recorded()` first, so the probe's positions never enter a lease's
commitments.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

_here = threading.local()


def recorded() -> bool:
    """False on a thread inside `unrecorded()`."""
    return not getattr(_here, "off", False)


@contextlib.contextmanager
def unrecorded() -> Iterator[None]:
    before = getattr(_here, "off", False)
    _here.off = True
    try:
        yield
    finally:
        _here.off = before
