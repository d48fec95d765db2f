"""The research report (docs/report/, `make report`): it builds from bench/results/*.json, every
number in it is measured, cited or structural, and the check that says so can fail."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("jinja2")
pytest.importorskip("markdown_it")
pytest.importorskip("yaml")

from maxwell_poi.report.build import render  # noqa: E402
from maxwell_poi.report.numbercheck import unsourced  # noqa: E402
from maxwell_poi.report.results import SOFT_FILES, MissingResult, Numbers, fmt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return render(ROOT, tmp_path_factory.mktemp("report"))


def test_every_number_is_measured_cited_or_structural(built):
    assert not built.offences, "\n".join(str(o) for o in built.offences)


def test_only_files_being_regenerated_may_be_missing(built):
    assert set(built.numbers.missing) <= SOFT_FILES
    for name in built.numbers.missing:
        assert f"not measured yet (bench/results/{name}.json" in built.body


def test_sections_figures_and_references(built):
    for n in range(1, 9):
        assert re.search(rf'<h2 id="[^"]*">{n} ', built.body), f"section {n} missing"
    assert built.body.count("<figure") >= 6
    refs = re.findall(r'<li id="ref-', built.body)
    assert len(refs) >= 15
    assert "{{" not in built.body and "[@" not in built.body and "[[" not in built.body


def test_every_placeholder_names_a_real_key(built):
    for title in re.findall(r'<span class="m" title="([^"]+)"', built.body):
        assert title.startswith(("derived: ", "parameter: ")) or re.match(r"[\w_]+\.json: ", title), title
    for name, keys in built.numbers.used.items():
        data = json.loads(built.numbers.path(name).read_text())  # bench/results, or OTHER_FILES
        assert data and keys


def test_a_hand_typed_number_is_flagged():
    plain = "<p>The audit is 17× faster than generation. It ran on GPT-2 with fp32 weights.</p>"
    found = unsourced(plain)
    assert [o.token for o in found] == ["17"]
    cited = '<p>The audit is 17× faster <span class="cite">[<a href="#ref-x">3</a>]</span>.</p>'
    assert unsourced(cited) == []
    measured = '<p>The audit is <span class="m" title="core.json: x">17</span>× faster.</p>'
    assert unsourced(measured) == []
    row = "<table><tr><td>audit</td><td>17</td></tr></table>"
    assert [o.token for o in unsourced(row)] == ["17"]
    two = '<p>Cited 5 <span class="cite">[1]</span>. Then 0.3 typed.</p>'
    assert [o.token for o in unsourced(two)] == ["0.3"]
    assert unsourced("<h2>4.2 Precision</h2><p>See Table 3 and Figure 2.</p>") == []
    assert unsourced("<p>two cores</p>", allow=[]) == [] and unsourced("<p>2 cores</p>", ["2 cores"]) == []


def test_strict_lookup_fails_naming_file_and_key(tmp_path):
    (tmp_path / "core.json").write_text(json.dumps({"a": {"b": 1.5}}))
    n = Numbers(tmp_path)
    assert ">1.5<" in n.r("core", "a/b")
    with pytest.raises(MissingResult, match=r"core\.json has no key 'a/c'"):
        n.r("core", "a/c")
    with pytest.raises(MissingResult, match=r"signals\.json missing"):
        n.r("signals", "x")
    with pytest.raises(MissingResult, match="may be missing"):
        n.maybe("signals", "x")
    (tmp_path / "core.json").write_text(json.dumps({"why": "token choice: got 39/256 off, worst at 3"}))
    n = Numbers(tmp_path)
    assert ">39/256<" in n.text("core", "why", after="got ", cut=" off")
    assert n.shown("class_pairs") == "src/maxwell_poi/data/class_pairs.json"


def test_soft_lookup_degrades_and_uses_what_exists(tmp_path):
    n = Numbers(tmp_path)
    assert "not measured yet (bench/results/zk.json missing)" in n.maybe("zk", "prove_to_native")
    assert n.warnings and "zk.json" in n.warnings[0]
    (tmp_path / "zk.json").write_text(json.dumps({"prove_to_native": 123456.0}))
    n = Numbers(tmp_path)
    assert "123,456" in n.maybe("zk", "prove_to_native") and not n.warnings


def test_formatting():
    assert fmt(16.62) == "16.6" and fmt(1466) == "1,466" and fmt(0.0044, 2) == "0.0044"
    assert fmt(3.3e-6, 2) == "3.3×10⁻⁶" and fmt(0.5, 3, 100) == "50"


def test_pdf_is_a_report_of_the_right_length(tmp_path):
    pytest.importorskip("weasyprint")
    from maxwell_poi.report.build import build

    done = build(ROOT, tmp_path)
    assert done.pdf_path and done.pdf_path.stat().st_size > 100_000
    assert 15 <= done.pages <= 25, f"{done.pages} pages"


def test_keys_with_slashes_dicts_and_list_items(tmp_path):
    (tmp_path / "exact.json").write_text(
        json.dumps(
            {"shapes": {"llama (GQA 32/4)": {"width": 2048}}, "ptn": {"attn_d16": 5.0}, "rows": [{"a": 1}]}
        )
    )
    n = Numbers(tmp_path)
    assert ">2,048<" in n.r("exact", "shapes/llama (GQA 32/4)/width")  # a key may hold a slash
    with pytest.raises(
        MissingResult, match=r"is a dict, not a number; name one of its items, e\.g\. ptn/attn_d16"
    ):
        n.x("exact", "ptn")
    assert ">5×<" in n.x("exact", "ptn/attn_d16") and ">1<" in n.r("exact", "rows/0/a")
    from maxwell_poi.report.build import _braced, _list_items_as_star

    assert _list_items_as_star(n._file("exact"), "rows/0/a") == "rows/*/a"
    assert (
        _list_items_as_star(n._file("exact"), "shapes/llama (GQA 32/4)/width")
        == "shapes/llama (GQA 32/4)/width"
    )
    assert _braced(["d/x/L1", "d/x/L2", "d/y/L1", "d/y/L2", "z"]) == ["d/{x, y}/{L1, L2}", "z"]
