"""The node's side of a gateway lease: relay each token and fingerprint chunk to the control plane
as the sandbox streams it, and cut the agent off when the answer says so.

The resident agent's reader thread calls `watch` for every line; it only queues (the reader's own
timestamps must not wait for HTTP). A relay thread posts what has queued — the first item alone, then
a few tokens at a time when they come fast — to `POST /v1/node/stream/{lease}` (a signed request).
An answer naming a reason to cut ends the lease at once (`ResidentAgent.cut`); the node then stops
the agent.
"""

from __future__ import annotations

import base64
import logging
import queue
import threading
import time
from collections.abc import Callable

import httpx

from ..protocol.stream import TaggedChunk, TaggedToken
from ..service.client import ServiceClient, ServiceRefused

log = logging.getLogger(__name__)
BATCH_WAIT_S = 0.005  # gather what arrives within this long into one post


class StreamRelay:
    def __init__(self, client: ServiceClient, path: str, on_cut: Callable[[str], None]) -> None:
        self.client = client
        self.path = path
        self.on_cut = on_cut
        self.cut_reason = ""
        self._posted = False  # nothing relayed yet
        self._queue: queue.Queue[tuple[str, list] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="poi-relay", daemon=True)
        self._thread.start()

    def watch(self, item: TaggedToken | TaggedChunk, t: float, cpu_s: float) -> None:
        if isinstance(item, TaggedToken):
            self._queue.put(("tokens", [item.position, item.token, round(t, 6), round(cpu_s, 6)]))
        else:
            self._queue.put(("chunks", [item.index, base64.b64encode(item.data).decode()]))

    def close(self, timeout_s: float = 30.0) -> None:
        """Flush what is queued and stop (after the lease ended, cut or answered)."""
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            body: dict[str, list] = {"tokens": [], "chunks": []}
            body[first[0]].append(first[1])
            # the first token goes out alone, at once: the requester's time to first token
            closing = self._gather(body) if self._posted else False
            self._posted = True
            if not self.cut_reason:
                self._post(body)
            if closing:
                return

    def _gather(self, body: dict[str, list]) -> bool:
        """Add whatever else arrives within BATCH_WAIT_S of the first item; True if the close marker
        came. The wait is bounded from the first item, not renewed by each: an agent streaming a
        token every few ms would otherwise be gathered into one post for its whole lease, and a
        requester's stop (carried by the answer to a post) would reach the node only at its end."""
        until = time.monotonic() + BATCH_WAIT_S
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, until - time.monotonic()))
            except queue.Empty:
                return False
            if item is None:
                return True
            body[item[0]].append(item[1])

    def _post(self, body: dict[str, list]) -> None:
        try:
            answer = self.client.request("POST", self.path, body, auth="signed")
        except (httpx.HTTPError, ServiceRefused) as exc:  # the control plane decides at intake anyway
            log.warning("relay to %s failed: %s", self.path, exc)
            return
        reason = answer.get("cut") if isinstance(answer, dict) else None
        if reason:
            self.cut_reason = str(reason)
            self.on_cut(self.cut_reason)
