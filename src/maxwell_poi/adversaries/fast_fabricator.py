"""Cheat: answer at once. Invented tokens are streamed as fast as the pipe takes them and the
receipt follows immediately: a result that arrives faster than the claimed work can be done."""

from __future__ import annotations

from ..protocol.receipt import sign_receipt
from ..registry.models import Registry
from ._agent import parser, run
from ._fake import garbage_claims, stream_paced


def main() -> None:
    args = parser(__doc__).parse_args()

    def answer_for(key):
        registry = Registry()

        def answer(lease):
            claims = garbage_claims(lease, registry)
            stream_paced(claims.tokens(), 0.0, lambda _deadline: None)
            return sign_receipt(claims, key)

        return answer

    run(args, answer_for)


if __name__ == "__main__":
    main()
