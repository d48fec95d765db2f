"""docs/receipt.md's tolerance tables, written from what the verifier ships (issue 24 item 8).

`python -m maxwell_poi.verifier.spec` rewrites the block between BEGIN and END in docs/receipt.md
from `Thresholds.load()` (data/thresholds.json and data/class_pairs.json, as the audit reads them);
`--check` only reports whether the block is current (exit 1 when it is not). A recalibration then
changes the spec with one command instead of by hand. tests/test_receipt_spec.py reads the document
itself and compares its numbers with the code, so a hand edit that drifts fails too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .thresholds import Thresholds, Tolerance

BEGIN = "<!-- tolerances: begin (python -m maxwell_poi.verifier.spec writes this block) -->"
END = "<!-- tolerances: end -->"
DOC = Path(__file__).resolve().parents[3] / "docs" / "receipt.md"
FIELDS = ("min_close", "max_median_rel", "token_gap", "logit_tol", "embed_max_abs")


def _number(value: float) -> str:
    # repr: the shortest text that reads back as the same float, so the doc holds the shipped value
    return repr(float(value))


def _row(name: str, precision: str, tol: Tolerance) -> str:
    cells = [name, precision, *(_number(getattr(tol, f)) for f in FIELDS)]
    return "| " + " | ".join(cells) + " |"


def render(thresholds: Thresholds | None = None) -> str:
    """The block's lines (markers excluded): the tolerance sets, then the measured class pairs."""
    rows, pairs = (thresholds or Thresholds.load()).published()
    lines = [
        "| set | precision | " + " | ".join(f"`{f}`" for f in FIELDS) + " |",
        "|---" * (2 + len(FIELDS)) + "|",
    ]
    lines += [_row(name, p, tol) for name, p, tol in rows]  # the file's order
    lines += [
        "",
        "Measured class pairs (`maxwell_poi/data/class_pairs.json`): a prover of the first class,",
        "appraised by a verifier of the second, gets the same-class set for that precision.",
        "",
    ]
    if not pairs:
        return "\n".join([*lines, "None ship."])
    lines += ["| prover class | verifier class | precision | measured in |", "|---|---|---|---|"]
    lines += [
        f"| `{p.prover}` | `{p.verifier}` | {p.precision} | {p.provenance.get('source', 'not recorded')} |"
        for p in pairs
    ]
    return "\n".join(lines)


def splice(doc: str, block: str) -> str:
    """`doc` with the text between its markers replaced by `block`."""
    head, found, rest = doc.partition(BEGIN + "\n")
    old, found_end, tail = rest.partition(END)
    if not found or not found_end:
        raise ValueError(f"expected the markers {BEGIN!r} and {END!r} in the document")
    return f"{head}{BEGIN}\n{block}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m maxwell_poi.verifier.spec", description=__doc__)
    parser.add_argument("--doc", type=Path, default=DOC, help="the wire spec to write (docs/receipt.md)")
    parser.add_argument("--check", action="store_true", help="only report whether the block is current")
    args = parser.parse_args(argv)
    text = args.doc.read_text()
    new = splice(text, render())
    if args.check:
        if new != text:
            print(f"{args.doc}: the tolerance tables differ from the shipped thresholds; run {parser.prog}")
            return 1
        print(f"{args.doc}: the tolerance tables are current")
        return 0
    if new != text:
        args.doc.write_text(new)
    print(f"{args.doc}: tolerance tables {'written' if new != text else 'already current'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
