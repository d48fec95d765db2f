"""Cheat or bug: send a receipt that is not one (truncated, oversized, or random bytes)."""

from __future__ import annotations

import secrets
from collections.abc import Callable

from ..protocol.keys import AgentKey
from ..protocol.lease import Lease
from ._agent import parser, run


def malformed(mode: str, size_mb: float) -> Callable[[AgentKey], Callable[[Lease], bytes]]:
    def answer_for(key: AgentKey) -> Callable[[Lease], bytes]:
        from ..protocol.receipt import sign_receipt
        from ..registry.models import Registry
        from ._fake import garbage_claims

        def answer(lease: Lease) -> bytes:
            if mode == "oversized":  # Maxwell stops reading past its limit: that is the point
                return b"A" * int(size_mb * (1 << 20))
            if mode == "garbage":  # no newlines, so it stays one (unreadable) receipt
                return secrets.token_bytes(4096).replace(b"\n", b"\x00")
            receipt = sign_receipt(garbage_claims(lease, Registry()), key)
            return receipt[: len(receipt) // 2]

        return answer

    return answer_for


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--mode", choices=["truncated", "oversized", "garbage"], required=True)
    p.add_argument("--size-mb", type=float, default=8.0, help="bytes written in oversized mode")
    args = p.parse_args()
    run(args, malformed(args.mode, args.size_mb), prober=None)  # no weights: it cannot answer a work probe


if __name__ == "__main__":
    main()
