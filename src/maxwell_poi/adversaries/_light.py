"""Boot an adversary without torch: the package's `__init__` loads nothing heavy, but the adversaries
package and the agent harness do. `main_light` re-executes the interpreter on the module's `serve()`
with a bare `maxwell_poi` package stub (same pid, same sandbox, same pipes), so the serving process
holds only what a weightless cheat would: the protocol's lease, stream and key modules.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

PACKAGE_DIR = str(Path(__file__).resolve().parents[1])
_BOOT = """
import sys, types
pkg = types.ModuleType("maxwell_poi")
pkg.__path__ = [{package!r}]
sys.modules["maxwell_poi"] = pkg
from maxwell_poi.adversaries.{module} import serve
sys.exit(serve(sys.argv[1:]))
"""


def main_light(
    module: str, parse_args: Callable[[list[str]], object], serve: Callable[[list[str]], int]
) -> None:
    args = sys.argv[1:]
    parse_args(args)  # usage errors here, before the re-exec
    if "torch" in sys.modules:  # loaded by the package's __init__: start over without it
        sys.stdout.flush()
        sys.stderr.flush()
        boot = _BOOT.format(package=PACKAGE_DIR, module=module)
        os.execv(sys.executable, [sys.executable, "-c", boot, *args])
    sys.exit(serve(args))
