"""docs/receipt.md says what the code does (issue 24 item 8): every tolerance set, class pair, trace
tolerance and predicate type the document states is read from the document and compared with the
value the verifier, the registry's shipped data and protocol/receipt.py actually use. Nothing here
restates a value: a recalibration or a protocol change without the doc (or the reverse) fails."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
from pathlib import Path

import pytest

from maxwell_poi.node.attest import EVIDENCE_PREDICATE
from maxwell_poi.protocol.encoding import b64
from maxwell_poi.protocol.errors import ReceiptFormatError
from maxwell_poi.protocol.fingerprint import CLOSE_REL
from maxwell_poi.protocol.keys import AgentKey
from maxwell_poi.protocol.lease import GenerateJob, Lease
from maxwell_poi.protocol.receipt import (
    PAYLOAD_TYPE,
    Fingerprints,
    ReceiptClaims,
    open_receipt,
    sign_receipt,
    statement_for,
    token_output,
)
from maxwell_poi.verifier import spec
from maxwell_poi.verifier.exact import FP32_TOLERANCE
from maxwell_poi.verifier.thresholds import NATIVE, REPLAY, Thresholds, Tolerance, load_class_pairs

DOC = Path(__file__).resolve().parents[1] / "docs" / "receipt.md"
URI = re.compile(r"https://maxwell-poi\.dev/[a-z]+/v\d+")
NUMBER = r"[0-9]+(?:\.[0-9]+)?(?:e-?[0-9]+)?"


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text()


def block(doc: str) -> str:
    start, end = doc.index(spec.BEGIN), doc.index(spec.END)
    return doc[start + len(spec.BEGIN) : end]


def cells(line: str) -> list[str]:
    return [cell.strip().strip("`") for cell in line.strip().strip("|").split("|")]


def table(text: str, first_header: str) -> tuple[list[str], list[list[str]]]:
    """The header and body rows of the markdown table whose header's first cell is `first_header`."""
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[head + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(cells(line))
    return cells(lines[head]), rows


def shipped_sets() -> dict[tuple[str, str], dict[str, float]]:
    t = Thresholds.load()
    out = {
        (name, precision): vars(tol)
        for name, sets in (("cross-class", t.by_precision), ("same-class", t.same_class), (NATIVE, t.native))
        for precision, tol in sets.items()
    }
    for precision, models in t.replay.items():  # one decode-replay set per model
        out.update({(f"{REPLAY} ({model})", precision): vars(tol) for model, tol in models.items()})
    return out


def test_the_tolerance_table_is_every_shipped_set_value_for_value(doc: str) -> None:
    header, rows = table(block(doc), "set")
    fields = header[2:]  # set, precision, then one column per tolerance field
    in_doc = {(r[0], r[1]): dict(zip(fields, (float(c) for c in r[2:]), strict=True)) for r in rows}
    shipped = shipped_sets()
    assert set(in_doc) == set(shipped), "the doc's (set, precision) rows are not the shipped ones"
    for key, values in shipped.items():
        assert in_doc[key] == values, f"{key}: the doc says {in_doc[key]}, the code uses {values}"


def test_the_class_pairs_are_the_shipped_ones(doc: str) -> None:
    _, rows = table(block(doc), "prover class")
    in_doc = {(r[0], r[1], r[2]) for r in rows}
    shipped = {(p.prover, p.verifier, p.precision) for p in load_class_pairs()}
    assert shipped, "no class pair ships: this test would check nothing"
    assert in_doc == shipped


def test_the_generated_block_is_current(doc: str) -> None:
    """`python -m maxwell_poi.verifier.spec --check` in test form."""
    assert spec.splice(doc, spec.render()) == doc, "run python -m maxwell_poi.verifier.spec"


def test_no_tolerance_is_quoted_elsewhere_with_another_value(doc: str) -> None:
    """A value quoted in prose ("`token_gap` … (fp32: 0.001; bf16: 0.05)") must be a shipped value of
    that field and precision, to the digits quoted: the old doc's 64 % and 0.0019 fail here."""
    shipped = shipped_sets()
    names = "|".join(f.name for f in dataclasses.fields(Tolerance))
    quoted = re.finditer(rf"`({names})`[^`(|]*\(((?:fp32|bf16): [^)]*)\)", doc)
    for match in quoted:
        field = match.group(1)
        for precision, text in re.findall(rf"(fp32|bf16): ({NUMBER}%?)", match.group(2)):
            value = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
            digits = text.rstrip("%").split("e")[0]
            decimals = len(digits.split(".")[1]) if "." in digits else 0
            step = 10.0**-decimals * (10.0 ** int(text.split("e")[1]) if "e" in text else 1.0)
            step /= 100 if text.endswith("%") else 1
            allowed = [v[field] for (_, p), v in shipped.items() if p == precision]
            assert any(abs(value - a) <= step / 2 + 1e-15 for a in allowed), (
                f"the doc quotes {field} {precision} = {text}; the code uses {allowed}"
            )


def test_the_trace_tolerance_is_l3s(doc: str) -> None:
    found = re.findall(rf"relative residual of ({NUMBER})", doc)
    assert found, "the doc names no L3 tolerance"
    assert all(float(v) == FP32_TOLERANCE for v in found), f"doc {found}, code {FP32_TOLERANCE}"


def test_the_fingerprint_closeness_is_the_audits(doc: str) -> None:
    found = re.findall(r"within 2\^(-?\d+) relative", doc)
    assert found, "the doc names no closeness for min_close"
    assert all(2.0 ** int(e) == CLOSE_REL for e in found), f"doc 2^{found}, code {CLOSE_REL}"


def claims() -> ReceiptClaims:
    lease = Lease.issue("alice", "gpt2-micro", GenerateJob(prompt="spec", max_new_tokens=1))
    return ReceiptClaims(
        lease=lease.lease_id,
        nonce=lease.nonce,
        agent="alice",
        model="gpt2-micro",
        weights="0" * 64,
        precision="fp32",
        input="0" * 64,
        output=token_output([7], 30522),
        fp=Fingerprints(k=4, chunk=1, data=b64(b"")),
        layers="0" * 64,
    )


def engine_claims() -> ReceiptClaims:
    """An engine receipt's claims (v4, docs/receipt.md "Engine receipts"): no fp or layers."""
    from maxwell_poi.protocol.engine import EngineClaim

    engine = EngineClaim(name="spec", fp_kind="tokens", decoding="greedy", finish="length")
    return claims().model_copy(update={"fp": None, "layers": None, "engine": engine})


def reads(predicate_type: str) -> bool:
    """Whether Maxwell's receipt parser accepts a receipt of this predicate type (without `trace`;
    v4, the engine receipt, with its `engine` object)."""
    made = engine_claims() if predicate_type.endswith("/v4") else claims()
    statement = {**statement_for(made), "predicateType": predicate_type}
    raw = json.loads(sign_receipt(made, AgentKey.generate()))
    raw["payload"] = b64(json.dumps(statement).encode())  # open_receipt checks shape, not signature
    try:
        open_receipt(json.dumps(raw).encode(), 1 << 20)
    except ReceiptFormatError:
        return False
    return True


def test_the_predicate_type_is_the_one_receipts_carry(doc: str) -> None:
    raw = json.loads(sign_receipt(claims(), AgentKey.generate()))
    assert raw["payloadType"] == PAYLOAD_TYPE
    written = json.loads(base64.b64decode(raw["payload"]))["predicateType"]
    examples = re.findall(r'"predicateType":\s*"([^"]+)"', doc)
    assert examples and set(examples) == {written}, f"the doc's Statement says {examples}, receipts {written}"
    l0 = [row for row in table(doc, "requirement")[1] if "predicateType" in row[0]]
    assert l0 and written in l0[0][0], "the L0 shape row does not name the predicate type written"
    assert f"receipt v{written.rsplit('/v', 1)[1]}" in doc.splitlines()[0], "the title names another version"


def test_every_predicate_type_named_is_one_maxwell_reads(doc: str) -> None:
    receipt_types = {u for u in URI.findall(doc) if "/receipt/" in u}
    assert receipt_types
    for uri in sorted(receipt_types):
        assert reads(uri), f"the doc names {uri}, which Maxwell's receipt parser refuses"
    for short in re.findall(r"…/receipt/(v\d+)", doc):  # "v2 receipts (`…/receipt/v2`)"
        assert reads(f"https://maxwell-poi.dev/receipt/{short}"), f"…/receipt/{short} is refused"
    assert not reads("https://maxwell-poi.dev/receipt/v1")  # the check can say no
    evidence_types = {u for u in URI.findall(doc) if "/evidence/" in u}
    assert evidence_types == {EVIDENCE_PREDICATE}


def test_the_generator_rewrites_a_stale_block(tmp_path: Path, doc: str) -> None:
    """`--check` says no to a stale block; a plain run writes the shipped values in its place."""
    stale = tmp_path / "receipt.md"
    stale.write_text(spec.splice(doc, "| set | precision |\n|---|---|\n| cross-class | fp32 |"))
    assert spec.main(["--doc", str(stale), "--check"]) == 1
    assert spec.main(["--doc", str(stale)]) == 0
    assert stale.read_text() == spec.splice(doc, spec.render())
    assert spec.main(["--doc", str(stale), "--check"]) == 0
