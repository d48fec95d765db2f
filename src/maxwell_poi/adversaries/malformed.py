"""Cheat or bug: send a receipt that is not one (truncated, oversized, or random bytes)."""

from __future__ import annotations

import secrets
import sys

from ._agent import parser
from ._fake import garbage_claims


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--mode", choices=["truncated", "oversized", "garbage"], required=True)
    p.add_argument("--size-mb", type=float, default=8.0, help="bytes written in oversized mode")
    args = p.parse_args()
    from ..protocol.keys import AgentKey
    from ..protocol.lease import Lease
    from ..protocol.receipt import sign_receipt
    from ..prover.harness import quiet_libraries
    from ..registry.models import Registry

    quiet_libraries()
    lease = Lease.from_json(sys.stdin.buffer.read())
    out = sys.stdout.buffer
    if args.mode == "oversized":
        block = b"A" * (1 << 20)
        for _ in range(int(args.size_mb)):
            try:
                out.write(block)
            except BrokenPipeError:  # Maxwell stopped reading: that is the point
                return
    elif args.mode == "garbage":
        out.write(secrets.token_bytes(4096))
    else:
        receipt = sign_receipt(garbage_claims(lease, Registry()), AgentKey.load(args.key))
        out.write(receipt[: len(receipt) // 2])
    out.flush()


if __name__ == "__main__":
    main()
