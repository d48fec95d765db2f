"""Cheat: do no inference at all. Stream random tokens at an honest-looking pace while sleeping,
then return them with invented commitments in a receipt that is well formed and validly signed.
Never loads the model (its reference values are public)."""

from __future__ import annotations

import time

from ._agent import parser, run
from ._fake import paced_garbage_agent, sleep_until


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--sleep", type=float, default=1.0, help="seconds to idle before answering")
    args = p.parse_args()
    run(
        args, paced_garbage_agent(sleep_until, before=lambda: time.sleep(args.sleep)), prober=None
    )  # no weights: it cannot answer a work probe


if __name__ == "__main__":
    main()
