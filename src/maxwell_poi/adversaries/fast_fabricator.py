"""Cheat: answer at once. Invented tokens are streamed as fast as the pipe takes them and the
receipt follows immediately: a result that arrives faster than the claimed work can be done."""

from __future__ import annotations

from ._agent import parser, run
from ._fake import paced_garbage_agent


def main() -> None:
    run(
        parser(__doc__).parse_args(), paced_garbage_agent(lambda _deadline: None, pace_s=0.0), prober=None
    )  # no weights: it cannot answer a work probe


if __name__ == "__main__":
    main()
