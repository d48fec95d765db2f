"""Every committed result traces to a script: each top-level key of bench/results/*.json is declared
by exactly one benchmark's WRITES (read statically, without importing torch-heavy scripts), each
declaring script writes through bench/common/results.py with that declaration, and the writer
merges, stamps and locks as it says."""

from __future__ import annotations

import ast
import json
import multiprocessing
from pathlib import Path

import pytest

from bench.common.results import META, PROVENANCE_KEYS, declared, write_result, write_results

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
# Results written by scripts of bench/gpu/ (its own stdlib-only atomic writer, bench/gpu/gpu_env.py, so
# the GPU machine needs nothing of this package): the writer must name each committed key literally.
EXTERNAL = {
    "gpu_core.json": BENCH / "gpu" / "cross_hardware.py",
    "gpu_next.json": BENCH / "gpu" / "next_run.py",
}
WRITERS = ("write_result", "write_results")


def _scripts() -> list[Path]:
    return sorted(p for p in BENCH.rglob("*.py") if "gpu" not in p.relative_to(BENCH).parts)


def _writes(path: Path) -> dict[str, list[str]] | None:
    """The module-level `WRITES = {...}` of a script, as a literal (None when it has none)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["WRITES"]:
            return ast.literal_eval(node.value)
    return None


def _declarations() -> dict[Path, dict[str, list[str]]]:
    return {p: w for p in _scripts() if (w := _writes(p)) is not None}


def _calls(path: Path) -> list[ast.Call]:
    return [
        n
        for n in ast.walk(ast.parse(path.read_text()))
        if isinstance(n, ast.Call) and getattr(n.func, "id", getattr(n.func, "attr", None)) in WRITERS
    ]


def _string_constants(path: Path) -> set[str]:
    return {
        n.value
        for n in ast.walk(ast.parse(path.read_text()))
        if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }


def test_every_committed_key_has_exactly_one_writer() -> None:
    decl = _declarations()
    assert len(decl) >= 20, sorted(p.name for p in decl)  # the scan found the benchmarks
    missing, shared = [], []
    files = sorted(RESULTS.glob("*.json"))
    assert files
    for file in files:
        data = json.loads(file.read_text())
        assert isinstance(data, dict), f"{file.name}: expected a JSON object, got {type(data).__name__}"
        if file.name in EXTERNAL:
            named = _string_constants(EXTERNAL[file.name])
            missing += [f"{file.name}:{k}" for k in data if k not in PROVENANCE_KEYS and k not in named]
            continue
        for key in data:
            if key in PROVENANCE_KEYS:
                continue
            writers = [p.relative_to(ROOT) for p, w in decl.items() if declared(w, file.name, key)]
            if not writers:
                missing.append(f"{file.name}:{key}")
            elif len(writers) > 1:
                shared.append(f"{file.name}:{key} <- {writers}")
    assert not missing, f"committed result keys that no script writes: {missing}"
    assert not shared, f"result keys with more than one writer: {shared}"


def test_every_declaring_script_writes_through_the_one_writer() -> None:
    for path, writes in _declarations().items():
        calls = _calls(path)
        name = path.relative_to(ROOT)
        assert calls, f"{name} declares WRITES but never calls write_result(s)"
        for call in calls:
            kw = {k.arg: k.value for k in call.keywords}
            assert getattr(kw.get("writes"), "id", None) == "WRITES", f"{name}:{call.lineno}: writes=WRITES"
            file = call.args[0] if call.args else None
            assert isinstance(file, ast.Constant) and file.value in writes, (
                f"{name}:{call.lineno}: expected a results file it declares {sorted(writes)}, "
                f"got {ast.unparse(file) if file else None}"
            )


def test_writer_merges_stamps_and_refuses_undeclared_keys(tmp_path: Path) -> None:
    out = tmp_path / "x.json"
    out.write_text(json.dumps({"theirs": 1}))
    writes = {"x.json": ["mine", "by_*"]}
    write_result("x.json", "mine", {"a": 1}, writes=writes, path=out)
    write_results("x.json", {"by_db": {"sqlite": 2}}, writes=writes, path=out)
    write_results("x.json", {"by_db": {"postgresql": 3}}, writes=writes, path=out, deep=["by_db"])
    data = json.loads(out.read_text())
    assert data["theirs"] == 1 and data["mine"] == {"a": 1}
    assert data["by_db"] == {"sqlite": 2, "postgresql": 3}
    stamp = data[META]["mine"]
    assert set(stamp) == {"command", "commit", "host", "time"} and stamp["commit"]
    assert stamp["host"]["cpus"] and "theirs" not in data[META]  # only keys this writer wrote
    with pytest.raises(ValueError, match=r"expected one of \['by_\*', 'mine'\], got \['other'\]"):
        write_result("x.json", "other", 1, writes=writes, path=out)
    with pytest.raises(ValueError, match="_meta"):
        write_result("x.json", META, 1, writes={"x.json": ["*"]}, path=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]  # no temp or lock file left


def test_writer_commit_comes_from_poi_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POI_COMMIT", "abc123")
    out = write_result("y.json", "k", 1, writes={"y.json": ["k"]}, path=tmp_path / "y.json")
    assert json.loads(out.read_text())[META]["k"]["commit"] == "abc123"


def _write_many(args: tuple[Path, str]) -> None:
    path, who = args
    for i in range(25):
        write_result("z.json", f"{who}_{i}", i, writes={"z.json": ["*"]}, path=path)


def test_concurrent_writers_lose_no_key(tmp_path: Path) -> None:
    path = tmp_path / "z.json"
    with multiprocessing.get_context("fork").Pool(3) as pool:
        pool.map(_write_many, [(path, w) for w in ("a", "b", "c")])
    data = json.loads(path.read_text())
    assert sorted(k for k in data if k != META) == sorted(f"{w}_{i}" for w in "abc" for i in range(25))
    assert set(data[META]) == set(data) - {META}
