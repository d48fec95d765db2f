"""A recorded trace fed through the live source API (trust RECORDED), so verifier code and
calibration run on real traces."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from .trace import Capability, Measurement, TrustLevel, load_trace


class ReplaySource:
    """A recorded trace through the live API, so verifier code and calibration run on real traces.

    end_window returns the recorded measurement with trust RECORDED (a SIMULATED trace stays
    SIMULATED: replay must not launder synthetic data). The name defaults to the recorded source's
    name so a replay slots into the Observer where the live source was.
    """

    trust = TrustLevel.RECORDED

    def __init__(self, path: str | os.PathLike[str], name: str | None = None) -> None:
        self.path = Path(path)
        self.recorded = load_trace(self.path)
        self.name = name or self.recorded.source
        if self.recorded.trust == TrustLevel.SIMULATED:
            self.trust = TrustLevel.SIMULATED
        self._open = False

    @property
    def available(self) -> bool:
        return True

    def capabilities(self) -> tuple[Capability, ...]:
        return self.recorded.capabilities

    def begin_window(self, pid: int | None = None) -> None:
        self._open = True

    def end_window(self) -> Measurement:
        if not self._open:
            raise RuntimeError(f"{self.name}: end_window without begin_window")
        self._open = False
        return replace(self.recorded, source=self.name, trust=self.trust)
