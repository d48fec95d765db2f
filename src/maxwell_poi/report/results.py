"""Numbers for the research report, read from bench/results/*.json at build time.

Every measured number in the report goes through one of the helpers of `Numbers`, which reads the
value, formats it and wraps it in a span that names its source (`<span class="m" title="exact.json:
freivalds_vs_recompute">0.181</span>`). The report's number check (`numbercheck.py`) treats the
digits inside such spans as measured and every other digit as a claim that needs a citation.

Two kinds of lookup:

- strict (`r`, `pct`, `x`, `val`, ...): a missing file or key raises `MissingResult` naming both,
  and the build fails — never a blank;
- degrading (`maybe`, `has`): for result files other engineers are regenerating (`SOFT_FILES`): a
  missing file or key prints a warning and the text says "not measured yet (bench/results/F.json
  missing)". A key that exists is always used.

Keys are paths inside the JSON: "generation/audit_speedup", list items by index ("rows/0/model").
A few measured files live outside bench/results (`OTHER_FILES`, paths from the repository root).
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SOFT_FILES = frozenset({"zk", "exact"})  # being regenerated while the report is written
# measured files kept elsewhere: the class pair written from gpu_core.json (bench.audit.class_pairs)
OTHER_FILES = {"class_pairs": "src/maxwell_poi/data/class_pairs.json"}
SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


class MissingResult(KeyError):
    """A strict placeholder named a result that does not exist."""

    def __str__(self) -> str:  # KeyError quotes its argument; say it plainly
        return str(self.args[0])


class NotANumber(MissingResult):
    """A number placeholder named a key whose value is a dict or list (name one of its items)."""


@dataclass
class Numbers:
    results_dir: Path
    root: Path | None = None  # the repository root, for OTHER_FILES (default: results_dir/../..)
    warnings: list[str] = field(default_factory=list)
    used: dict[str, set[str]] = field(default_factory=dict)  # file -> keys read
    missing: dict[str, set[str]] = field(default_factory=dict)  # soft lookups that found nothing
    _cache: dict[str, Any] = field(default_factory=dict)

    # ---------------------------------------------------------------- lookups
    def path(self, name: str) -> Path:
        """Where result file `name` is read from."""
        if name in OTHER_FILES:
            return (self.root or self.results_dir.parent.parent) / OTHER_FILES[name]
        return self.results_dir / f"{name}.json"

    @staticmethod
    def shown(name: str) -> str:
        """The file's path as the report names it (relative to the repository root)."""
        return OTHER_FILES.get(name, f"bench/results/{name}.json")

    def _file(self, name: str) -> Any:
        if name not in self._cache:
            path = self.path(name)
            self._cache[name] = json.loads(path.read_text()) if path.exists() else None
        return self._cache[name]

    def _lookup(self, name: str, key: str) -> tuple[bool, Any, str]:
        """(found, value, why-not)."""
        data = self._file(name)
        if data is None:
            return False, None, f"{self.shown(name)} missing"
        node = data
        parts = key.split("/")
        i = 0
        while i < len(parts):
            part = parts[i]
            if isinstance(node, dict):
                # a key may itself hold a slash ("llama-shape-1b (..., GQA 32/4, seeded)"): take the
                # shortest run of parts that names a key
                for j in range(i + 1, len(parts) + 1):
                    if "/".join(parts[i:j]) in node:
                        node, i = node["/".join(parts[i:j])], j
                        break
                else:
                    return False, None, f"{self.shown(name)} has no key {key!r} (stopped at {part!r})"
            elif (
                isinstance(node, list) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node)
            ):
                node, i = node[int(part)], i + 1
            else:
                return False, None, f"{self.shown(name)} has no key {key!r} (stopped at {part!r})"
        return True, node, ""

    def val(self, name: str, key: str) -> Any:
        """The raw value (for loops, arithmetic and conditions); strict."""
        found, value, why = self._lookup(name, key)
        if not found:
            raise MissingResult(f"report placeholder: {why}")
        self.used.setdefault(name, set()).add(key)
        return value

    def exists(self, name: str, key: str) -> bool:
        """Whether a key exists, without recording a miss (for tables that say themselves what is
        missing or failed, and for figures that skip a point)."""
        return self._lookup(name, key)[0]

    def keys(self, name: str) -> list[str]:
        """The top-level keys of a result file ([] when the file is missing)."""
        data = self._file(name)
        return list(data) if isinstance(data, dict) else []

    def has(self, name: str, key: str = "") -> bool:
        """Whether a result exists (file, or file and key); a miss is recorded as a warning."""
        if not key:
            ok = self._file(name) is not None
            why = f"{self.shown(name)} missing"
        else:
            ok, _, why = self._lookup(name, key)
        if not ok:
            self._note_missing(name, key, why)
        return ok

    def _note_missing(self, name: str, key: str, why: str) -> None:
        if name not in SOFT_FILES:
            raise MissingResult(f"report placeholder: {why} (only {sorted(SOFT_FILES)} may be missing)")
        self.missing.setdefault(name, set()).add(key or "*")
        msg = f"warning: {why}; the report says 'not measured yet'"
        if msg not in self.warnings:
            self.warnings.append(msg)

    # ---------------------------------------------------------------- rendering
    def span(self, text: str, src: str, cls: str = "m") -> str:
        return f'<span class="{cls}" title="{html.escape(src)}">{html.escape(text)}</span>'

    def _number(self, name: str, key: str) -> Any:
        value = self.val(name, key)
        if isinstance(value, dict | list):
            inner = list(value)[:6] if isinstance(value, dict) else list(range(min(len(value), 6)))
            raise NotANumber(
                f"report placeholder: {self.shown(name)} key {key!r} is a {type(value).__name__}, "
                f"not a number; name one of its items, e.g. {', '.join(f'{key}/{k}' for k in inner)}"
            )
        return value

    def r(self, name: str, key: str, digits: int = 3, unit: str = "", scale: float = 1.0) -> str:
        """A measured number, formatted (ints with thousands separators, floats to `digits`
        significant figures), with an optional unit after a thin space. A string value is shown as
        it is (a measured label, e.g. a variant's name or a failure's reason)."""
        value = self._number(name, key)
        return self.span(fmt(value, digits, scale) + (f" {unit}" if unit else ""), f"{name}.json: {key}")

    def x(self, name: str, key: str, digits: int = 3) -> str:
        """A ratio shown as a factor: 16.6×."""
        return self.span(fmt(self._number(name, key), digits) + "×", f"{name}.json: {key}")

    def pct(self, name: str, key: str, digits: int = 3) -> str:
        """A fraction shown as a percentage: 0.0044 -> 0.44 %."""
        return self.span(fmt(self._number(name, key), digits, 100.0) + " %", f"{name}.json: {key}")

    def frac(self, name: str, num: str, den: str) -> str:
        """Counts as 'a/b'."""
        a, b = self.val(name, num), self.val(name, den)
        return self.span(f"{fmt(a)}/{fmt(b)}", f"{name}.json: {num} / {den}")

    def maybe(self, name: str, key: str, digits: int = 3, unit: str = "", kind: str = "r") -> str:
        """Like r/x/pct, but for a file being regenerated: says 'not measured yet' when absent."""
        ok, _, why = self._lookup(name, key)
        if not ok:
            self._note_missing(name, key, why)
            return self.span(
                f"not measured yet ({why.split(' has no key')[0]}"
                + ("" if "missing" in why else f", key {key}")
                + ")",
                f"{name}.json: {key}",
                cls="miss",
            )
        return {
            "r": lambda: self.r(name, key, digits, unit),
            "x": lambda: self.x(name, key, digits),
            "pct": lambda: self.pct(name, key, digits),
        }[kind]()

    def text(
        self, name: str, key: str, maxlen: int = 90, cut: str = "|", drop: str = "", after: str = ""
    ) -> str:
        """A measured string (a variant's name, a failure's reason), from the first `after` (when
        given and present) up to `cut`, at most `maxlen` characters, without a leading `drop`; its
        digits count as read from the file."""
        value = str(self.val(name, key))
        if after and after in value:
            value = value.split(after, 1)[1]
        value = value.split(cut)[0].strip()
        value = value.removeprefix(drop) if drop else value
        if len(value) > maxlen:
            value = value[: maxlen - 1].rstrip() + "…"
        return self.span(value, f"{name}.json: {key}")

    def d(self, value: float, src: str, digits: int = 3, unit: str = "", times: bool = False) -> str:
        """A number derived from measured ones by the template's arithmetic; `src` says how."""
        text = fmt(value, digits) + ("×" if times else "") + (f" {unit}" if unit else "")
        return self.span(text, f"derived: {src}")

    def p(self, value: float | str, why: str = "an assumption of this analysis") -> str:
        """A parameter the analysis chooses (not a measurement); rendered in italics."""
        text = value if isinstance(value, str) else fmt(value)
        return self.span(text, f"parameter: {why}", cls="p")


def fmt(value: Any, digits: int = 3, scale: float = 1.0) -> str:
    """Numbers the way a paper prints them."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return str(value)
    if isinstance(value, int) and scale == 1.0:
        return f"{value:,}"
    v = float(value) * scale
    if v == 0:
        return "0"
    if not math.isfinite(v):
        return str(v)
    if abs(v) >= 10 ** (digits + 2) and float(v).is_integer():
        return f"{int(v):,}"
    mag = math.floor(math.log10(abs(v)))
    if mag < -3:
        mant = round(v / 10**mag, max(digits - 1, 0))
        if abs(mant) >= 10:
            mant, mag = mant / 10, mag + 1
        m = f"{mant:.{max(digits - 1, 0)}f}".rstrip("0").rstrip(".")
        return f"{m}×10{str(mag).translate(SUPERSCRIPT)}"
    decimals = max(digits - 1 - mag, 0)
    out = f"{round(v, decimals):,.{decimals}f}"
    if "." in out:
        out = out.rstrip("0").rstrip(".")
    return out
