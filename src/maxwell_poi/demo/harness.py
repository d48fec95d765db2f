"""What every part of `poi demo` shares: a control plane served on loopback, this host's resident
profile, and the command lines that start honest agents and adversaries."""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..node.resident_runs import measure_resident_profile
from ..observer.evidence import resident_profile_key
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


def ensure_profile(model_id: str, tokens: int, runs: int = 5) -> None:
    """L1 and L2 (and the gateway's running checks) judge against this host's resident profile."""
    store = ProfileStore()
    if store.get(model_id, resident_profile_key()) is None:
        # batch 2 too: the gateway's node serves waves of 2, and L1 cannot judge a batched window
        # without that batch size's profile (it would say so, and the verdict would be a warning)
        store.put(measure_resident_profile(model_id, runs=runs, tokens=tokens, batches=(1, 2)))


def adversary_argv(module: str, key: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", f"maxwell_poi.adversaries.{module}", "--key", str(key), "--resident", *args]
