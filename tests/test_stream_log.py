"""node.stream_log: every CPU-nanosecond of a busy span is billed to exactly one lease."""

from __future__ import annotations

import random

import pytest

from maxwell_poi.node.stream_log import StreamLog


def test_a_lease_queued_behind_another_pays_only_what_came_after_its_turn() -> None:
    """The case the token share over-billed: B waits while A runs, so A's whole run lies inside
    B's window; B must pay only the CPU that produced its own tokens and receipt."""
    log = StreamLog()
    log.begin(1_000)  # A in
    log.begin(1_000)  # B in, same moment: the span already started
    for i, cpu in enumerate((11_000, 21_000, 31_000)):
        log.token("A", arrived=1.0 + i, cpu_ns=cpu)
    a = log.finish("A", 36_000, last=False)
    for i, cpu in enumerate((46_000, 56_000)):
        log.token("B", arrived=5.0 + i, cpu_ns=cpu)
    b = log.finish("B", 61_000, last=True)
    assert a == pytest.approx(35_000 / 1e9)
    assert b == pytest.approx(25_000 / 1e9)
    assert a + b == pytest.approx((61_000 - 1_000) / 1e9)


def test_tokens_of_one_read_split_their_batch_steps_cpu() -> None:
    log = StreamLog()
    log.begin(0)
    log.token("A", arrived=1.0, cpu_ns=9_000)  # the step's CPU, read at the first of its tokens
    log.token("B", arrived=1.0, cpu_ns=9_000)
    log.token("C", arrived=1.0, cpu_ns=9_300)
    a = log.finish("A", 9_300, last=False)
    b = log.finish("B", 9_300, last=False)
    c = log.finish("C", 9_300, last=True)
    assert (a, b, c) == pytest.approx((3_100 / 1e9, 3_100 / 1e9, 3_100 / 1e9))


def test_cpu_burnt_with_no_lease_in_flight_is_no_leases() -> None:
    log = StreamLog()
    log.begin(0)
    log.token("A", arrived=1.0, cpu_ns=500)
    assert log.finish("A", 600, last=True) == pytest.approx(600 / 1e9)
    log.begin(10_000)  # the sandbox burnt 9,400 ns idle: the idle gap's evidence, not B's bill
    log.token("B", arrived=9.0, cpu_ns=10_700)
    assert log.finish("B", 10_800, last=True) == pytest.approx(800 / 1e9)


def test_a_stale_reading_from_another_thread_bills_nothing_negative() -> None:
    log = StreamLog()
    log.begin(5_000)
    log.token("A", arrived=1.0, cpu_ns=8_000)
    log.token("B", arrived=2.0, cpu_ns=7_000)  # read before A's, processed after it
    assert log.finish("B", 7_500, last=False) == 0.0
    assert log.finish("A", 9_000, last=True) == pytest.approx(4_000 / 1e9)


def test_every_span_is_billed_exactly_once_whatever_the_interleaving() -> None:
    rng = random.Random(7)
    for _ in range(200):
        log, cpu, t = StreamLog(), rng.randrange(10**6), 0.0
        start, open_, billed = cpu, [], 0.0
        for lease in range(rng.randrange(1, 6)):
            log.begin(cpu)
            open_.append(f"L{lease}")
        while open_:
            cpu += rng.randrange(0, 10**5)
            if rng.random() < 0.2:
                lid = open_.pop(rng.randrange(len(open_)))
                billed += log.finish(lid, cpu, last=not open_)
            else:
                t += rng.choice((0.0, 0.01))  # sometimes the same read as the token before
                log.token(rng.choice(open_), arrived=t, cpu_ns=cpu)
        assert billed == pytest.approx((cpu - start) / 1e9, rel=1e-9, abs=1e-12)


def test_between_names_the_tokens_in_a_window_and_forgets_old_ones() -> None:
    log = StreamLog()
    log.begin(0)
    for t, lid in ((1.0, "A"), (2.0, "B"), (3.0, "A"), (4.0, "B")):
        log.token(lid, arrived=t, cpu_ns=int(t * 100))
    assert log.between(2.0, 3.0) == ["B", "A"]
    log.forget_before(2.5)
    assert log.between(0.0, 9.0) == ["A", "B"]
