"""One EZKL step in a child process (circuits.capped.run_capped starts it by path, so the child
imports ezkl alone: no torch, no package start-up inside the measured time).

    python ezkl_child.py setup '{"folder": ..., "srs": ...}'
    python ezkl_child.py prove '{"folder": ..., "srs": ..., "work": ...}'

Its peak RSS (KiB) goes to the file named by "peak", so the parent can record it.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path


def main(step: str, args: dict[str, str]) -> None:
    import ezkl

    folder = Path(args["folder"])
    compiled = str(folder / "block.ezkl")
    if step == "setup":
        if not ezkl.setup(compiled, str(folder / "vk"), str(folder / "pk"), args["srs"]):
            raise SystemExit("ezkl.setup returned False")
    elif step == "prove":
        work = Path(args["work"])
        ezkl.gen_witness(str(work / "input.json"), compiled, str(work / "witness.json"))
        ezkl.prove(
            str(work / "witness.json"), compiled, str(folder / "pk"), str(work / "proof.json"), args["srs"]
        )
    else:
        raise SystemExit(f"unknown step {step!r}")
    Path(args["peak"]).write_text(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
