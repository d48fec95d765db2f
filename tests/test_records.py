"""Typed records both ways: evidence and profiles survive their JSON form, and a malformed file
is refused with a message naming the field, what it should be and what came."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from maxwell_poi.observer.evidence import DecodeWindow, LeaseEvidence
from maxwell_poi.observer.telemetry import Capability, Measurement, TrustLevel
from maxwell_poi.registry.profiles import Profile, ProfileStore, Stats


def evidence() -> LeaseEvidence:
    """SYNTHETIC TEST INPUT: evidence of three streamed tokens with one process trace."""
    trace = Measurement(
        source="process",
        trust=TrustLevel.RECORDED,
        device="synthetic",
        started_at=100.0,
        duration_s=0.2,
        t=[0.0, 0.1, 0.2],
        series={"cpu_util": [0.5, math.nan, 0.7]},
        totals={"cpu_s": 0.12},
        capabilities=(Capability("cpu_util", True, "synthetic"),),
    )
    return LeaseEvidence(
        started_at=100.0,
        finished_at=101.0,
        wall_s=1.0,
        cpu_s=0.4,
        max_rss_kb=2048,
        bytes_in=10,
        bytes_out=20,
        sha256_in="a" * 64,
        sha256_out="b" * 64,
        exit_code=0,
        stream_tokens=(5, 6, 7),
        stream_t=(0.5, 0.6, 0.8),
        stream_cpu_s=(0.2, 0.25, 0.35),
        telemetry={"process": trace},
        device_class="cpu:synthetic",
    )


def test_evidence_round_trips_through_json():
    ev = evidence()
    back = LeaseEvidence.from_dict(json.loads(json.dumps(ev.as_dict())))
    assert back.stream_tokens == (5, 6, 7) and back.stream_t == ev.stream_t
    assert back.decode_window == DecodeWindow(wall_s=pytest.approx(0.3), cpu_s=pytest.approx(0.15), tokens=2)
    assert np.isnan(back.telemetry["process"].series["cpu_util"][1])
    assert back.as_dict() == json.loads(json.dumps(ev.as_dict()))


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"stream_t": "soon"}, "stream_t: expected tuple[float, ...], got 'soon'"),
        ({"exit_code": "zero"}, "exit_code: expected"),
        ({"surprise": 1}, "unknown ['surprise']"),
        ({"telemetry": {"process": {"format": "other"}}}, "trace format: expected 'maxwell-poi-trace/v1'"),
        ({"telemetry": [1]}, "telemetry: expected an object of traces, got list"),
    ],
)
def test_malformed_evidence_is_refused_with_the_field_named(change, fragment):
    data = {**evidence().as_dict(), **change}
    with pytest.raises(ValueError, match="evidence.json") as info:
        LeaseEvidence.from_dict(data, "evidence.json")
    assert fragment in str(info.value)


def test_missing_required_evidence_field_is_named():
    data = evidence().as_dict()
    del data["wall_s"]
    with pytest.raises(ValueError, match="expected field 'wall_s', missing"):
        LeaseEvidence.from_dict(data)
    with pytest.raises(ValueError, match="got list"):
        LeaseEvidence.from_dict([data])


def test_decode_window_needs_two_tokens():
    one = LeaseEvidence.from_dict({**evidence().as_dict(), "stream_t": [0.5], "stream_cpu_s": [0.2]})
    assert one.decode_window is None


def test_profile_statistics_are_typed_and_stored_as_before(tmp_path):
    s = Stats.of([0.02, 0.04, 0.03])
    assert (s.min, s.max, s.median) == (0.02, 0.04, 0.03) and s.mean == pytest.approx(0.03)
    profile = Profile("dev", "m", 3, 8, s, s, s, s, 1e9, 1e9, 0.0, [1, 2])
    store = ProfileStore(tmp_path / "profiles.json")
    store.put(profile)
    raw = json.loads((tmp_path / "profiles.json").read_text())
    assert raw["dev"]["m"]["interval_s"]["median"] == 0.03  # the file format did not change
    got = store.get("m", "dev")
    assert got == profile and isinstance(got.interval_s, Stats)
    assert store.get("m", "other-device") is None
    with pytest.raises(ValueError, match="expected mean/std/min/max/median"):
        Profile("dev", "m", 3, 8, {"mean": 1.0}, s, s, s, 1e9, 1e9, 0.0, [1])
    with pytest.raises(ValueError, match="at least one value"):
        Stats.of([])
