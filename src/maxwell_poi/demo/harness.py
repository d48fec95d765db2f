"""What every part of `poi demo` shares: a control plane served on loopback, this host's resident
profile, and the command lines that start honest agents and adversaries."""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..node.thread_profiles import measure_threaded_profile, thread_counts
from ..observer.evidence import resident_profile_key
from ..registry.models import Registry
from ..registry.profiles import ProfileStore


def python_module(module: str, key: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", module, "--key", str(key), *extra]


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class LoopbackServer:
    """The control plane's app served by uvicorn in a thread, on a free loopback port."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        # proto IPPROTO_TCP, not 0: asyncio turns Nagle off only on sockets that say they are TCP, and
        # with it on every response written in two parts (headers, body) waits ~40 ms for a delayed ACK
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, name="poi-demo-server", daemon=True
        )

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the control plane did not start on {self.url}")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *_exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def ensure_profile(
    model_id: str,
    tokens: int,
    runs: int = 5,
    batches: Sequence[int] = (1, 2),
    registry: Registry | None = None,
) -> None:
    """L1 and L2 (and the gateway's running checks) judge against this host's resident profile,
    measured as `poi profile --resident` does: at 1, 2 and N threads. Measured when missing, and
    again when it has only the default thread count's runs: on a busy host those spin and burn
    several times the CPU per token an honest agent keeping fewer cores busy needs, and L1 refused
    the demo's own honest chat by such a floor (27.2 CPU-ms per token expected of one doing 5.8).
    Batch 2 is in the default batches: the gateway's node serves waves of 2, and L1 cannot judge a
    batched window without that batch size's profile (the verdict would be a warning)."""
    store = ProfileStore()
    known = store.get(model_id, resident_profile_key())
    if known is None or not known.threads_runs:
        threads = thread_counts()  # 1, 2 and this host's CPU count: `poi profile --resident`'s default
        store.put(
            measure_threaded_profile(
                model_id, threads=threads, runs=runs, tokens=tokens, batches=batches, registry=registry
            )
        )


def adversary_argv(module: str, key: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", f"maxwell_poi.adversaries.{module}", "--key", str(key), "--resident", *args]
