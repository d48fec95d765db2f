"""Cheat: relay. The agent does no inference: it forwards each cleartext lease to an honest worker
elsewhere (`relay_worker`, over a Unix socket, outside the agent's sandbox), re-emits the worker's
tokens on its own channel the moment they come back, then re-signs the worker's claims with its
own key. Every receipt is right, the stream is right and paced like real decoding (it is real
decoding, one hop away), and the signature is the enrolled agent's: L0, L2 and L4 all pass.

What catches it is the work the sandbox did not do: L1 judges the sandbox's CPU (and memory)
over the lease window against the leased model's profile, and a relay's sandbox shows a few
milliseconds of JSON and one Ed25519 signature per lease, no weights in memory. (Constantinople's
red-team finding; a relay that hides the hop also needs the worker's machine to be the one
measured, which is why Maxwell measures the sandbox it started and nothing the agent reports.)

    python -m maxwell_poi.adversaries.relay_worker --key worker.pem --listen /tmp/w.sock &
    python -m maxwell_poi.adversaries.relay --key agent.pem --resident --upstream /tmp/w.sock

Padded (issue 24): `--pad-cores N --hold-mb M` burns N cores in the sandbox while a lease is in
flight and holds M MB, so L1 sees an honest agent's CPU and memory; then the work probe
(node.probe) is what is left: with `--probes refuse` (the default) the relay says it cannot answer,
with `--probes forward` it forwards the probe to its worker too (which passes wherever the sandbox
can reach the worker: the sandbox's isolation is the defence there, not the probe).

Kept light (adversaries._light): the serving process holds no torch, and re-signs the worker's DSSE
payload directly (what `sign_receipt(open_receipt(...).claims, key)` would produce, without the
heavy import).
"""

from __future__ import annotations

import argparse
import json
import socket
from pathlib import Path

from securesystemslib.dsse import Envelope

from ..protocol.errors import PoiError
from ..protocol.keys import AgentKey
from ..protocol.lease import Lease
from ..protocol.probe import refuse_probe
from ..protocol.stream import TaggedReceipt, TaggedRefusal, TaggedToken, parse_resident_line
from ..prover.harness import one_at_a_time, serve_one, serve_resident
from ..prover.stream import current_sink
from ._light import main_light
from ._pad import Padding

MAX_LINE = 64 << 20


class RelayError(PoiError):
    """The relay could not get an answer upstream; serve_resident turns it into a refusal line."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--key", type=Path, required=True, help="this agent's private key (PEM)")
    p.add_argument("--upstream", type=Path, required=True, help="the worker's Unix socket")
    p.add_argument("--resident", action="store_true", help="answer lease after lease until stdin closes")
    p.add_argument("--threads", type=int, default=None, help="ignored: the relay computes nothing")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait on the worker per lease")
    p.add_argument("--pad-cores", type=int, default=0, help="cores burnt while a lease is in flight")
    p.add_argument("--hold-mb", type=int, default=0, help="memory held (touched) the whole time")
    p.add_argument("--probes", choices=("refuse", "forward"), default="refuse", help="work probes")
    return p.parse_args(argv)


def resign(receipt: bytes, key: AgentKey, lease: Lease) -> bytes:
    """The worker's receipt with its signature replaced by `key`'s. The claims (lease, nonce, agent
    id, output, commitments) are the worker's, byte for byte: only the signer changes."""
    try:
        envelope = Envelope.from_dict(json.loads(receipt))
        claims = json.loads(envelope.payload)["predicate"]
    except (ValueError, KeyError, TypeError) as exc:
        raise RelayError(f"relay: the worker's receipt does not read as a DSSE envelope: {exc}") from None
    if claims.get("lease") != lease.lease_id:
        raise RelayError(f"relay: the worker answered lease {claims.get('lease')!r}, not {lease.lease_id}")
    envelope.signatures = {}
    envelope.sign(key.signer)
    return json.dumps(envelope.to_dict(), separators=(",", ":")).encode()


def relay_answer(key: AgentKey, upstream: Path, timeout_s: float):
    def answer(lease: Lease) -> bytes:
        sink = current_sink()  # bound to this lease's id by one_at_a_time (tagged lines)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout_s)
        try:
            sock.connect(str(upstream))
        except OSError as exc:
            sock.close()
            raise RelayError(f"relay: no upstream worker at {upstream} ({exc.strerror or exc})") from None
        try:
            with sock, sock.makefile("rwb") as f:
                f.write(lease.to_json().encode() + b"\n")
                f.flush()
                while line := f.readline(MAX_LINE):
                    try:
                        item = parse_resident_line(line)
                    except ValueError as exc:
                        raise RelayError(f"relay: the worker wrote {exc}") from None
                    if item.lease_id not in (lease.lease_id, ""):
                        raise RelayError(f"relay: the worker answered lease {item.lease_id}")
                    if isinstance(item, TaggedToken):
                        if sink:
                            sink(item.position, item.token)
                    elif isinstance(item, TaggedReceipt):
                        return resign(item.receipt, key, lease)
                    elif isinstance(item, TaggedRefusal):
                        raise RelayError(f"relay: the worker refused: {item.error}")
        except OSError as exc:
            raise RelayError(f"relay: lost the worker at {upstream} ({exc})") from None
        raise RelayError(f"relay: the worker at {upstream} hung up before its receipt")

    return answer


def forward_probe(upstream: Path, timeout_s: float):
    """A prober that asks the worker: one probe line over a connection of its own, one line back."""

    def prober(raw: bytes) -> bytes:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout_s)
                sock.connect(str(upstream))
                with sock.makefile("rwb") as f:
                    f.write(raw if raw.endswith(b"\n") else raw + b"\n")
                    f.flush()
                    return f.readline(MAX_LINE) or refuse_probe(raw, "relay: the worker hung up")
        except OSError as exc:
            return refuse_probe(raw, f"relay: no worker for the probe ({exc})")

    return prober


def padded(answer, padding: Padding):
    def busy_answer(lease: Lease) -> bytes:
        with padding.busy():
            return answer(lease)

    return busy_answer


def serve(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    answer = relay_answer(AgentKey.load(args.key), args.upstream, args.timeout)
    if args.pad_cores or args.hold_mb:  # forked before the harness starts its threads
        answer = padded(answer, Padding(args.pad_cores, args.hold_mb))
    prober = forward_probe(args.upstream, args.timeout) if args.probes == "forward" else None
    return serve_resident(one_at_a_time(answer), prober=prober) if args.resident else serve_one(answer)


def main() -> None:
    main_light("relay", parse_args, serve)


if __name__ == "__main__":
    main()
