"""Every number in the report is measured, cited, or structural.

`unsourced(html)` scans the rendered HTML and returns the numeric tokens that are none of:

1. **measured**: inside a placeholder's span (`class="m"`, from bench/results via `results.Numbers`),
   a declared parameter (`class="p"`) or a "not measured yet" note (`class="miss"`);
2. **cited**: in a sentence, table row, caption or heading that carries a citation
   (`<span class="cite">`);
3. **structural**: in code (`<code>`, `<pre>`: commands, file names, JSON keys), in the table of
   contents or the reference list, a heading's own section number, "Figure 3" / "Table 2" /
   "Section 4" / "Appendix B" style cross-references, or a phrase of the allow-list
   (docs/report/allow.yaml, kept small and documented there);
4. **identifiers**: a token glued to letters in one word ("GPT-2", "L4", "fp32", "d384", "x86_64").

Sentences are split at ". ", "? ", "! " and "; " (not after "et al.", "e.g.", "i.e.", "cf.", "vs.").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from html.parser import HTMLParser

BLOCKS = {
    "p",
    "li",
    "tr",
    "figcaption",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "dt",
    "dd",
    "blockquote",
    "caption",
}
WHOLE = {"annot", "tr", "figcaption", "h1", "h2", "h3", "h4", "h5", "h6", "caption"}  # cited as one unit
VOID = {"img", "br", "hr", "meta", "link", "input", "col", "source", "wbr"}
NUMBER = re.compile(r"[0-9⁰¹²³⁴⁵⁶⁷⁸⁹]+(?:[.,][0-9⁰¹²³⁴⁵⁶⁷⁸⁹]+)*")
XREF = re.compile(
    r"\b(?:Figures?|Tables?|Sections?|Appendix|Appendices|§)\s+(?:[0-9][0-9.]*|[A-Z]\b)"
    r"(?:\s*(?:,|and|–|-)\s*(?:[0-9][0-9.]*|[A-Z]\b))*"
)
HEADING_NUMBER = re.compile(r"^\s*(?:[A-Z]|\d+)(?:\.\d+)*\.?\s")
SENTENCE_END = re.compile(r"(?<!\bet al)(?<!\be\.g)(?<!\bi\.e)(?<!\bcf)(?<!\bvs)[.?!;](?=\s)")


@dataclass(frozen=True)
class Offence:
    token: str
    context: str

    def __str__(self) -> str:
        return f"{self.token!r} in: {self.context}"


class _Scanner(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, str]] = []  # (tag, mode it sets or "")
        self.block_tag: list[str] = []
        self.buf: list[tuple[str, str]] = []  # (mode, text)
        self.blocks: list[tuple[str, list[tuple[str, str]]]] = []

    def _mode(self) -> str:
        for _, mode in reversed(self.stack):
            if mode:
                return mode
        return "t"

    def _flush(self) -> None:
        if any(t.strip() for _, t in self.buf):
            self.blocks.append((self.block_tag[-1] if self.block_tag else "p", self.buf))
        self.buf = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in VOID:
            return
        cls = dict(attrs).get("class") or ""
        classes = set(cls.split())
        mode = ""
        if classes & {"m", "p", "miss"}:
            mode = "m"
        elif "cite" in classes:
            mode = "c"
        elif tag in {"code", "pre", "script", "style", "nav"} or classes & {
            "references",
            "provenance",
            "toc",
        }:
            mode = "s"
        if tag in BLOCKS:
            self._flush()
            self.block_tag.append("annot" if "annot" in classes else tag)
        self.stack.append((tag, mode))
        if tag in {"td", "th"}:
            self.buf.append(("t", " | "))

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        while self.stack:
            t, _ = self.stack.pop()
            if t == tag:
                break
        if tag in BLOCKS:
            self._flush()
            if self.block_tag:
                self.block_tag.pop()

    def handle_data(self, data: str) -> None:
        self.buf.append((self._mode(), data))


def _units(tag: str, segs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Split a block into (text, modes) units: whole for rows/captions/headings, else sentences."""
    text = "".join(t for _, t in segs)
    modes = "".join(m * len(t) for m, t in segs)
    if tag in WHOLE:
        return [(text, modes)]
    cuts, start = [], 0
    for m in SENTENCE_END.finditer(text):
        if modes[m.start()] == "t":
            cuts.append((start, m.end()))
            start = m.end()
    cuts.append((start, len(text)))
    return [(text[a:b], modes[a:b]) for a, b in cuts if text[a:b].strip()]


def _allowed_spans(text: str, allow: list[str], heading: bool) -> list[tuple[int, int]]:
    spans = [m.span() for m in XREF.finditer(text)]
    for phrase in allow:
        spans += [(m.start(), m.end()) for m in re.finditer(re.escape(phrase), text)]
    if heading and (m := HEADING_NUMBER.match(text)):
        spans.append(m.span())
    return spans


def unsourced(html_text: str, allow: list[str] | None = None) -> list[Offence]:
    scanner = _Scanner()
    scanner.feed(html_text)
    scanner.close()
    scanner._flush()
    allow = allow or []
    found: list[Offence] = []
    for tag, segs in scanner.blocks:
        for text, modes in _units(tag, segs):
            if "c" in modes:
                continue  # a cited sentence / row / caption
            masked = "".join(ch if md == "t" else " " for ch, md in zip(text, modes, strict=True))
            spans = _allowed_spans(masked, allow, heading=tag.startswith("h"))
            for m in NUMBER.finditer(masked):
                a, b = m.span()
                if any(s <= a and b <= e for s, e in spans):
                    continue
                ws, we = a, b
                while ws > 0 and not masked[ws - 1].isspace():
                    ws -= 1
                while we < len(masked) and not masked[we].isspace():
                    we += 1
                word = masked[ws:we]
                if any(ch.isalpha() for ch in word):
                    continue  # an identifier: GPT-2, L4, fp32, d384
                found.append(Offence(m.group(), " ".join(text.split())[:200]))
    return found
