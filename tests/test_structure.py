"""The package's shape: imports only point down the role order, no cycles, no oversized files,
and every third-party import is declared in pyproject.toml (no dependency arriving by accident)."""

from __future__ import annotations

import ast
import importlib.metadata
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "maxwell_poi"
# The role order of README's layout section: a package may import only from packages of a lower
# level (the same level for its own modules). Siblings of one level stay apart where named.
LEVEL = {
    "data": 0,  # shipped JSON (thresholds, workload table): no code
    "protocol": 0,
    "registry": 1,
    "circuits": 2,  # registered blocks as EZKL circuits: above the registry, shared by prover and verifier
    "prover": 2,
    "observer": 2,
    "verifier": 3,
    "ledger": 4,
    "economics": 4,
    "service": 5,
    "gateway": 5,
    "node": 5,
    "adversaries": 6,  # leaf programs
    "cli": 6,
    "demo": 6,
    "report": 6,
    "__main__": 7,
}
SIBLINGS_APART = {("verifier", "prover"), ("observer", "prover"), ("prover", "observer")}
MAX_LINES = 500


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """maxwell_poi modules `path` imports anywhere (function bodies too), except under TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    skip = {
        id(sub)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for sub in ast.walk(node)
    }
    mod = _module(path)
    base = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            out.add(target)
            out.update(f"{target}.{a.name}" for a in node.names)
    return {i for i in out if i.split(".")[0] == "maxwell_poi"}


def _graph() -> dict[str, set[str]]:
    files = {_module(f): f for f in PACKAGE.rglob("*.py")}
    graph = {}
    for mod, f in files.items():
        deps = set()
        for imp in _imports(f):
            while imp and imp not in files:  # `from .x import name`: name is not a module
                imp = imp.rpartition(".")[0]
            if imp and imp not in (mod, "maxwell_poi"):
                deps.add(imp)
        graph[mod] = deps
    return graph


def _role(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_imports_point_down_the_role_order():
    problems = []
    for mod, deps in _graph().items():
        for dep in deps:
            a, b = _role(mod), _role(dep)
            if a in LEVEL and b in LEVEL and LEVEL[b] > LEVEL[a]:
                problems.append(f"upward: {mod} -> {dep}")
            if (a, b) in SIBLINGS_APART:
                problems.append(f"sibling: {mod} -> {dep}")
    assert not problems, "\n".join(sorted(problems))


def test_every_package_has_a_level():
    roles = {_role(m) for m in _graph()} - {None}
    assert roles <= set(LEVEL), f"packages without a place in the role order: {roles - set(LEVEL)}"


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The checks above can fail: on a planted pair of modules they report both problems."""
    pkg = tmp_path / "maxwell_poi"
    for sub in ("protocol", "verifier"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "protocol" / "a.py").write_text("from ..verifier import b\n")
    (pkg / "verifier" / "b.py").write_text("def f():\n    from ..protocol import a\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    with pytest.raises(AssertionError, match="upward: maxwell_poi.protocol.a -> maxwell_poi.verifier.b"):
        test_imports_point_down_the_role_order()
    with pytest.raises(AssertionError, match="maxwell_poi.protocol.a -> maxwell_poi.verifier.b"):
        test_no_import_cycle()


def test_no_source_file_is_oversized():
    big = {
        str(f.relative_to(ROOT)): n
        for f in PACKAGE.rglob("*.py")
        if (n := f.read_text().count("\n")) > MAX_LINES
    }
    assert not big, f"files over {MAX_LINES} lines: {big}"


def _third_party_imports() -> set[str]:
    names = set()
    for f in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "maxwell_poi"}


def _declared() -> set[str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = set()
    for spec in deps:
        name = spec.split(";")[0].split("[")[0]
        for sep in "<>=!~ ":
            name = name.split(sep)[0]
        names.add(name.strip().lower().replace("_", "-"))
    return names


# imported only where the code says so, on machines that have them (the GPU miner's kernel)
OPTIONAL = {"triton", "ray"}  # extras: imported lazily where they are used
OPTIONAL |= {"jinja2", "markdown_it", "yaml", "weasyprint"}  # the `report` extra (report/build.py only)
OPTIONAL |= {"ezkl", "onnx"}  # the `zk` extra (circuits/block_circuit.py, verifier/zk.py; imported lazily)
OPTIONAL |= {"gguf"}  # the `engines` extra (registry/gguf_export.py, used by the engine tests only)


def test_every_import_is_declared():
    distributions = importlib.metadata.packages_distributions()
    declared = _declared()
    missing = {}
    for name in _third_party_imports() - OPTIONAL:
        dists = {d.lower().replace("_", "-") for d in distributions.get(name, [])}
        if not dists & declared:
            missing[name] = sorted(dists) or ["(not installed)"]
    assert not missing, f"imported but not declared in pyproject.toml dependencies: {missing}"


# -- the fast path (issue 22 item 5): the wire protocol, the service client and the CLI's entry load
# no torch, transformers or numpy, so a relying party need not install them and `poi` answers at once
HEAVY = ("torch", "transformers", "numpy")
_CLI = (
    "from typer.testing import CliRunner; from maxwell_poi.cli import app; "
    "r = CliRunner().invoke(app, {argv!r}); assert r.exit_code == 0, r.output"
)
FAST_PATHS = [
    f"import maxwell_poi.protocol.{f.stem}" for f in sorted((PACKAGE / "protocol").glob("[!_]*.py"))
]
FAST_PATHS += ["import maxwell_poi.protocol", "import maxwell_poi", "import maxwell_poi.service.client"]
FAST_PATHS += [
    _CLI.format(argv=argv) for argv in (["--help"], ["client", "--help"], ["client", "balance", "--help"])
]


@pytest.mark.parametrize("code", FAST_PATHS)
def test_the_fast_path_imports_no_torch_nor_numpy(code):
    import subprocess

    probe = f"{code}\nimport sys\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    loaded = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert not loaded, f"`{code}` imported {loaded} (expected none of {HEAVY})"
