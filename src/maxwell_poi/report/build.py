"""Build the research report: docs/report/*.md.j2 -> one HTML page and a PDF.

    python -m maxwell_poi.report.build [--root REPO] [--out DIR] [--no-pdf]      (`make report`)

Steps: Jinja2 renders the Markdown template with the helpers of `results.Numbers` (every measured
number read from bench/results/*.json, a missing key fails the build naming file and key) and the
figure helpers (matplotlib PNGs from the same JSON); citations `[@key]` become numbered references
from docs/report/bibliography.yaml; markdown-it-py renders HTML; the number check
(`numbercheck.unsourced`) refuses any number that is neither measured, cited nor structural;
WeasyPrint writes the PDF. Nothing is fetched from the network (fonts are the system's).
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import yaml
from markdown_it import MarkdownIt

from . import figures as figs
from .cite import Bibliography
from .numbercheck import Offence, unsourced
from .results import Numbers

HERE = Path(__file__).resolve()


class ReportError(RuntimeError):
    pass


@dataclass
class Built:
    html: str
    body: str  # the rendered article (what the number check reads)
    warnings: list[str]
    offences: list[Offence]
    numbers: Numbers
    html_path: Path | None = None
    pdf_path: Path | None = None
    pages: int = 0
    figures: dict[str, Path] = field(default_factory=dict)


def default_root() -> Path:
    for cand in (Path.cwd(), *HERE.parents):
        if (cand / "docs" / "report" / "report.md.j2").exists():
            return cand
    raise ReportError("cannot find docs/report/report.md.j2 above the working directory or the package")


class _Figures:
    """Numbers figures and tables in order of first mention; draws each PNG once."""

    def __init__(self, numbers: Numbers, src: Path, out: Path) -> None:
        self.numbers, self.src, self.out = numbers, src, out
        self.no: dict[str, int] = {}
        self.tables: dict[str, int] = {}
        self.paths: dict[str, Path] = {}

    def ref(self, name: str) -> str:
        if name not in figs.FIGURES:
            raise ReportError(f"unknown figure {name!r} (have {sorted(figs.FIGURES)})")
        return str(self.no.setdefault(name, len(self.no) + 1))

    def tref(self, name: str) -> str:
        return str(self.tables.setdefault(name, len(self.tables) + 1))

    def table(self, name: str, caption: str) -> str:
        return f'<p class="tcap"><b>Table {self.tref(name)}.</b> {caption}</p>'

    def figure(self, name: str, caption: str, missing: str = "") -> str:
        number = self.ref(name)
        fn = figs.FIGURES[name]
        fig = fn(self.numbers, self.src / "data") if name == "ezkl" else fn(self.numbers)
        if fig is None:
            return (
                f'<figure class="absent"><figcaption><b>Figure {number}.</b> {caption} '
                f'<span class="miss">{html.escape(missing or "not drawn: its result file is missing")}'
                "</span></figcaption></figure>\n"
            )
        # a half-width figure is printed at about half the text width, not blown up to all of it
        cls = ' class="half"' if fig.get_figwidth() < 0.75 * figs.WIDTH else ""
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=200)
        import matplotlib.pyplot as plt

        plt.close(fig)
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"fig-{name}.png"
        path.write_bytes(buf.getvalue())
        self.paths[name] = path
        data = base64.b64encode(buf.getvalue()).decode()
        return (
            f'<figure id="fig-{name}"{cls}><img src="data:image/png;base64,{data}" alt="Figure {number}">'
            f"<figcaption><b>Figure {number}.</b> {caption}</figcaption></figure>\n"
        )


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def _headings_and_toc(body: str) -> tuple[str, str]:
    toc = []

    def add_id(m: re.Match[str]) -> str:
        level, inner = m.group(1), m.group(2)
        plain = re.sub(r"<[^>]+>", "", inner)
        hid = _slug(plain)
        if level in ("2", "3"):
            toc.append(f'<li class="toc{level}"><a href="#{hid}">{inner}</a></li>')
        return f'<h{level} id="{hid}">{inner}</h{level}>'

    body = re.sub(r"<h([1-4])>(.*?)</h\1>", add_id, body)
    return body, '<nav class="toc"><h2 class="tocht">Contents</h2><ul>' + "".join(toc) + "</ul></nav>"


def _list_items_as_star(data: object, key: str) -> str:
    """Items of a list read one by one ("settings_table/3/prove_s") are listed once, with a star."""
    parts, out, i = key.split("/"), [], 0
    while i < len(parts):
        if isinstance(data, list):
            ok = parts[i].lstrip("-").isdigit() and -len(data) <= int(parts[i]) < len(data)
            data = data[int(parts[i])] if ok else None
            out.append("*")
            i += 1
        elif isinstance(data, dict):
            j = next((j for j in range(i + 1, len(parts) + 1) if "/".join(parts[i:j]) in data), i + 1)
            data = data.get("/".join(parts[i:j]))
            out.append("/".join(parts[i:j]))
            i = j
        else:
            out += parts[i:]
            break
    return "/".join(out)


def _braced(keys: list[str]) -> list[str]:
    """Keys listed compactly, losslessly: siblings share their parent ("a/b/{x, y}"), then parents
    with the same children share their own parent ("a/{b, c}/{x, y}")."""

    def group(items: list[tuple[str, str]]) -> list[tuple[str, str]]:
        by: dict[tuple[str, str], list[str]] = {}
        for head, tail in items:
            parent, _, last = head.rpartition("/")
            by.setdefault((parent, tail), []).append(last)
        out = []
        for (parent, tail), lasts in by.items():
            if len(lasts) == 1 or not parent:
                out += [(f"{parent}/{x}" if parent else x, tail) for x in lasts]
            else:
                out.append((parent, "{" + ", ".join(lasts) + "}" + (f"/{tail}" if tail else "")))
        return out

    items = [(k, "") for k in keys]
    for _ in range(2):
        items = group(items)
    return sorted(f"{head}/{tail}" if tail else head for head, tail in items)


def _provenance(numbers: Numbers, commands: dict[str, str]) -> str:
    rows = []
    for name in sorted(numbers.used):
        keys = sorted({_list_items_as_star(numbers._file(name), k) for k in numbers.used[name]})
        cmd = commands.get(name, "(see the file's own 'command' key)")
        shown = ", ".join(f"<code>{html.escape(k)}</code>" for k in _braced(keys))
        rows.append(
            f"<tr><td><code>{numbers.shown(name)}</code></td><td><code>{html.escape(cmd)}</code>"
            f'</td><td>{len(keys)}</td><td class="keys">{shown}</td></tr>'
        )
    for name, keys in sorted(numbers.missing.items()):
        rows.append(
            f"<tr><td><code>{numbers.shown(name)}</code></td><td><code>"
            f'{html.escape(commands.get(name, ""))}</code></td><td>—</td><td class="keys">'
            f'<span class="miss">missing at build time: {html.escape(", ".join(sorted(keys))[:300])}'
            "</span></td></tr>"
        )
    return (
        '<table class="provenance"><thead><tr><th>result file</th><th>command that writes it</th>'
        "<th>keys</th><th>keys read by this report</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )


def render(root: Path, out: Path, template: str = "report.md.j2", results_dir: Path | None = None) -> Built:
    src = root / "docs" / "report"
    numbers = Numbers(results_dir or root / "bench" / "results", root=root)
    figures = _Figures(numbers, src, out / "figures")
    bib = Bibliography.load(src / "bibliography.yaml")
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(src)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
    )
    env.globals.update(
        r=numbers.r,
        text=numbers.text,
        x=numbers.x,
        pct=numbers.pct,
        frac=numbers.frac,
        val=numbers.val,
        has=numbers.has,
        exists=numbers.exists,
        keys=numbers.keys,
        maybe=numbers.maybe,
        d=numbers.d,
        p=numbers.p,
        fig=figures.figure,
        figref=figures.ref,
        table=figures.table,
        tref=figures.tref,
        annotated=bib.annotated,
    )
    env.filters["log"] = math.log
    text = env.get_template(template).render()
    text = bib.resolve(text)
    md = MarkdownIt("commonmark", {"html": True, "typographer": False}).enable("table")
    body = md.render(text)
    body, toc = _headings_and_toc(body)
    commands = yaml.safe_load((src / "commands.yaml").read_text())
    body = body.replace("<p>[[TOC]]</p>", toc).replace("[[TOC]]", toc)
    body = body.replace("<p>[[REFERENCES]]</p>", bib.references_html())
    body = body.replace("<p>[[PROVENANCE]]</p>", _provenance(numbers, commands))
    allow = yaml.safe_load((src / "allow.yaml").read_text())["phrases"]
    offences = unsourced(body, allow)
    css = (src / "style.css").read_text()
    page = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>Proof of Inference for Maxwell: a measured report</title>"
        f"<style>\n{css}\n</style></head><body>\n{body}\n</body></html>\n"
    )
    return Built(page, body, numbers.warnings, offences, numbers, figures=figures.paths)


def build(root: Path, out: Path, pdf: bool = True, strict: bool = True) -> Built:
    built = render(root, out)
    for w in built.warnings:
        print(w, file=sys.stderr)
    if built.offences:
        listing = "\n  ".join(str(o) for o in built.offences[:40])
        msg = f"{len(built.offences)} number(s) neither measured nor cited:\n  {listing}"
        if strict:
            raise ReportError(msg)
        print("warning: " + msg, file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    built.html_path = out / "report.html"
    built.html_path.write_text(built.html)
    if pdf:
        import weasyprint

        built.pdf_path = out / "report.pdf"
        document = weasyprint.HTML(string=built.html, base_url=str(out)).render()
        built.pages = len(document.pages)
        document.write_pdf(str(built.pdf_path))
    return built


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=None, help="repository root (default: found from here)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default docs/report/build)")
    ap.add_argument("--no-pdf", action="store_true")
    ap.add_argument("--lenient", action="store_true", help="warn about unsourced numbers instead of failing")
    args = ap.parse_args(argv)
    root = args.root or default_root()
    out = args.out or root / "docs" / "report" / "build"
    try:
        built = build(root, out, pdf=not args.no_pdf, strict=not args.lenient)
    except (ReportError, KeyError, jinja2.TemplateError) as exc:
        print(f"report: {exc}", file=sys.stderr)
        return 1
    print(
        f"wrote {built.html_path}"
        + (f" and {built.pdf_path} ({built.pages} pages)" if built.pdf_path else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
