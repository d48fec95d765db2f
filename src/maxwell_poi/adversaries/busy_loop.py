"""Cheat: look busy without inferring. A tight Python loop keeps a core at 100% between tokens
streamed at an honest pace; the tokens and commitments are invented."""

from __future__ import annotations

import time

from ._agent import parser, run
from ._fake import paced_garbage_agent


def spin_until(deadline: float) -> None:
    x = 0
    while time.perf_counter() < deadline:
        x += 1


def main() -> None:
    run(
        parser(__doc__).parse_args(), paced_garbage_agent(spin_until), prober=None
    )  # no weights: it cannot answer a work probe


if __name__ == "__main__":
    main()
