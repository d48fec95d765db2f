"""The far end of the relay cheat (see `relay`): an honest prover serving leases over a local Unix
socket, with its own key, outside the sandbox Maxwell measures.

Per connection: one lease line in; the tagged token lines (`{"s":[pos,tok],"l":"<lease_id>"}`) out
as the tokens are chosen; then the tagged receipt line, signed with the worker's key (or a refusal
line). A connection whose line is a work probe (protocol.probe) gets the probe's answer instead.
Connections are served on threads of their own, leases one at a time. Nothing here cheats: it
stands for whatever honest machine a relay forwards its leases to, so that the relay itself can be
seen doing no work.

    python -m maxwell_poi.adversaries.relay_worker --key worker.pem --listen /tmp/worker.sock
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import BinaryIO

from ..protocol.errors import PoiError
from ..protocol.keys import AgentKey
from ..protocol.lease import Lease
from ..protocol.probe import PROBE_REQUEST_PREFIX
from ..protocol.stream import receipt_line, refusal_line
from ..prover.harness import quiet_libraries
from ..prover.sdk import Prover
from ..prover.stream import bound_to_lease, streaming_leases_to

MAX_LEASE_LINE = 4 << 20


def serve_connection(prover: Prover, f: BinaryIO, one_lease: threading.Lock) -> None:
    """One lease over one connection: token lines as they come, then the receipt line (or one
    probe line: its answer)."""
    raw = f.readline(MAX_LEASE_LINE)
    if not raw.strip():
        return
    if raw.startswith(PROBE_REQUEST_PREFIX):
        f.write(prover.probe_line(raw))
        f.flush()
        return
    with one_lease:
        serve_lease(prover, f, raw)


def serve_lease(prover: Prover, f: BinaryIO, raw: bytes) -> None:
    try:
        lease = Lease.from_json(raw.strip())
    except PoiError as exc:
        f.write(refusal_line("", str(exc)))
        f.flush()
        return
    try:
        with streaming_leases_to(f, threading.Lock()), bound_to_lease(lease.lease_id):
            receipt = prover.run(lease)
    except PoiError as exc:
        f.write(refusal_line(lease.lease_id, f"worker: {exc}"))
        f.flush()
        return
    f.write(receipt_line(lease.lease_id, receipt))
    f.flush()


def listen(path: Path) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a stale socket from an earlier run
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    # open to every uid: a confined relay (its own uid) reaches it only because the socket is named
    # on its command line and its owner lets anyone connect (node.sandbox.grants)
    os.chmod(path, 0o666)
    server.listen(16)
    return server


def serve(prover: Prover, server: socket.socket) -> None:
    one_lease = threading.Lock()

    def handle(conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as f:
            try:
                serve_connection(prover, f, one_lease)
            except OSError as exc:  # the relay hung up mid-lease: serve the next one
                print(f"relay_worker: connection lost: {exc}", file=sys.stderr, flush=True)

    while True:
        conn, _ = server.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--key", type=Path, required=True, help="the worker's own private key (PEM)")
    p.add_argument("--listen", type=Path, required=True, help="Unix socket path to serve on")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    quiet_libraries()
    prover = Prover(AgentKey.load(args.key), threads=args.threads)
    server = listen(args.listen)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # unlink the socket on a plain kill too
    print(f"relay_worker: listening on {args.listen}", file=sys.stderr, flush=True)
    try:
        serve(prover, server)
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        with contextlib.suppress(OSError):
            os.unlink(args.listen)


if __name__ == "__main__":
    main()
