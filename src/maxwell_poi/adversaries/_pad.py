"""Padding: what a cheat burns and holds so that L1 sees an honest agent's CPU and memory.

Stdlib only (the relay and the cache boot without torch). `Padding(cores, hold_mb)` forks `cores`
children that spin while a lease is in flight (`with padding.busy():`) and sleep otherwise (a
sandbox busy between leases is caught by L1's between-leases check), and holds `hold_mb` of
touched memory. Children are in the sandbox (forked), so Maxwell charges their CPU to it: that is
the point. They exit when their parent does.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import time
from collections.abc import Iterator

PAGE = 4096


class Padding:
    def __init__(self, cores: int, hold_mb: int) -> None:
        self.hold = bytearray(hold_mb << 20)
        for i in range(0, len(self.hold), PAGE):  # touched: resident, not just reserved
            self.hold[i] = 1
        self.flag = mmap.mmap(-1, 1)  # shared with the children: 1 while a lease is in flight
        self.children = [pid for pid in (self._fork() for _ in range(cores)) if pid]

    def _fork(self) -> int:
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the child: spin while the flag is up, until the parent is gone
            try:
                while os.getppid() == parent:
                    if self.flag[0]:
                        x = 0
                        for i in range(20_000):
                            x += i
                    else:
                        time.sleep(0.001)
            finally:
                os._exit(0)
        return pid

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        self.flag[0] = 1
        try:
            yield
        finally:
            self.flag[0] = 0
