"""The gateway's timeline of one completion (gateway.timeline): stages between the marks reached."""

from maxwell_poi.gateway.timeline import Mark, Timeline


def test_stages_are_the_gaps_between_marks_and_unreached_ones_are_absent() -> None:
    timeline = Timeline(started=10.0)
    timeline.at[Mark.ISSUED] = 10.010
    timeline.at[Mark.PULLED] = 10.015
    timeline.at[Mark.FIRST_TOKEN] = 10.100
    stages = timeline.stages_ms()
    assert stages == {"issue": 10.0, "to_node": 5.0, "first_token": 85.0, "total": 100.0}


def test_a_mark_counts_the_first_time_it_is_reached() -> None:
    timeline = Timeline()
    timeline.mark(Mark.ISSUED)
    first = timeline.at[Mark.ISSUED]
    timeline.mark(Mark.ISSUED)
    assert timeline.at[Mark.ISSUED] == first
    assert timeline.stages_ms()["issue"] >= 0
