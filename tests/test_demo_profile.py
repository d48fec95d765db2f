"""The demo measures its resident profiles as `poi profile --resident` does, per thread count, and
measures again a profile that has only the default thread count's runs: on a busy host such a
profile's floor refused the demo's own honest chat (27.2 CPU-ms per token expected of an agent doing
5.8). The store and the measurement are stand-ins here (the real measurement is tested in
tests/test_thread_profiles.py); what is tested is the decision to measure."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from maxwell_poi.demo import harness


class StandInStore:
    """A profile store holding one stored profile (or none), recording what is put."""

    def __init__(self, stored: Any) -> None:
        self.stored, self.put_calls = stored, []

    def get(self, model_id: str, device: str) -> Any:
        return self.stored

    def put(self, profile: Any) -> None:
        self.put_calls.append(profile)


@pytest.mark.parametrize(
    ("stored", "measured"),
    [
        (None, True),  # none yet
        (SimpleNamespace(threads_runs={}), True),  # default thread count only: measured again
        (SimpleNamespace(threads_runs={"1": object(), "2": object()}), False),  # per thread: kept
    ],
)
def test_the_demo_measures_per_thread_profiles(
    monkeypatch: pytest.MonkeyPatch, stored: Any, measured: bool
) -> None:
    store = StandInStore(stored)
    calls: list[dict] = []

    def measure(model_id: str, **kw: Any) -> str:
        calls.append({"model_id": model_id, **kw})
        return "profile"

    monkeypatch.setattr(harness, "ProfileStore", lambda: store)
    monkeypatch.setattr(harness, "measure_threaded_profile", measure)
    harness.ensure_profile("gpt2-micro", 8)
    assert bool(calls) is measured
    if measured:
        assert 1 in calls[0]["threads"] and len(calls[0]["threads"]) >= 1, calls
        assert store.put_calls == ["profile"]
    else:
        assert store.put_calls == []
