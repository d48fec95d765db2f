"""Cheat: run another model (smaller, or same shape with other weights) and claim the leased one."""

from __future__ import annotations

from ._agent import SwappedProver, parser, run


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--substitute", required=True, help="model id actually run")
    args = p.parse_args()
    run(args, lambda key: SwappedProver(key, lambda _lease, reg: reg.load(args.substitute)).run)


if __name__ == "__main__":
    main()
