"""Citations: `[@key]` or `[@a; @b]` in the report's Markdown, resolved against
docs/report/bibliography.yaml into numbered references (numbered by first citation)."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CITE = re.compile(r"\[(@[\w:.-]+(?:\s*;\s*@[\w:.-]+)*)\]")
FIELDS = ("key", "authors", "title", "venue", "year", "url", "group")
GROUPS = {
    "zk": "Zero-knowledge and succinct proofs of inference",
    "optimistic": "Optimistic, statistical and fingerprint-based verification",
    "power": "Power, telemetry and side-channel identification",
    "attestation": "Hardware attestation and trusted execution",
    "systems": "Deployed systems, tools and project documents",
}


class BibliographyError(ValueError):
    pass


@dataclass
class Bibliography:
    entries: dict[str, dict[str, Any]]
    order: list[str] = field(default_factory=list)  # keys by first citation

    @classmethod
    def load(cls, path: Path) -> Bibliography:
        raw = yaml.safe_load(path.read_text())
        entries = {}
        for e in raw:
            missing = [f for f in FIELDS if f not in e]
            if missing:
                raise BibliographyError(f"{path.name}: entry {e.get('key', e)!r} lacks {missing}")
            if e["group"] not in GROUPS:
                raise BibliographyError(
                    f"{path.name}: {e['key']}: group {e['group']!r} not in {list(GROUPS)}"
                )
            if e["key"] in entries:
                raise BibliographyError(f"{path.name}: key {e['key']!r} twice")
            entries[e["key"]] = e
        return cls(entries)

    def number(self, key: str) -> int:
        if key not in self.entries:
            raise BibliographyError(f"citation [@{key}] is not in bibliography.yaml")
        if key not in self.order:
            self.order.append(key)
        return self.order.index(key) + 1

    def resolve(self, text: str) -> str:
        """Replace every citation with numbered links."""

        def one(m: re.Match[str]) -> str:
            keys = [k.strip().lstrip("@") for k in m.group(1).split(";")]
            links = ", ".join(f'<a href="#ref-{k}">{self.number(k)}</a>' for k in keys)
            return f'<span class="cite">[{links}]</span>'

        return CITE.sub(one, text)

    def entry_html(self, key: str) -> str:
        e = self.entries[key]
        url = html.escape(e["url"])
        return (
            f"{html.escape(e['authors'])}. <em>{html.escape(e['title'])}</em>. "
            f'{html.escape(e["venue"])}, {e["year"]}. <a class="url" href="{url}">{url}</a>'
        )

    def references_html(self) -> str:
        items = "\n".join(
            f'<li id="ref-{k}" value="{i + 1}">{self.entry_html(k)}</li>' for i, k in enumerate(self.order)
        )
        return f'<ol class="references">\n{items}\n</ol>'

    def annotated(self, groups: tuple[str, ...] = ("zk", "optimistic", "power", "attestation")) -> str:
        """HTML of the annotated bibliography: the entries with a note, by group. Each entry is one
        list item of class "annot", which the number check reads as one cited unit."""
        out = []
        for g in groups:
            keys = [k for k, e in self.entries.items() if e["group"] == g and e.get("note")]
            if not keys:
                continue
            out.append(f"<p><strong>{html.escape(GROUPS[g])}.</strong></p>\n<ul>")
            for k in keys:
                e = self.entries[k]
                out.append(
                    f'<li class="annot"><em>{html.escape(e["title"])}</em> ({html.escape(e["venue"])}) '
                    f"[@{k}]. {html.escape(e['note'].strip())}</li>"
                )
            out.append("</ul>")
        return "\n".join(out) + "\n"
