"""Prometheus metrics of one control plane (its own registry, so several can live in one process)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..protocol.result import AttestationResult

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class WalletTotals(Collector):
    """Money by account kind (wallet, escrow, revenue, external), read from the ledger at scrape."""

    def __init__(self, balances: Callable[[], dict[str, int]]) -> None:
        self.balances = balances

    def collect(self) -> Iterator[GaugeMetricFamily]:
        totals: dict[str, int] = defaultdict(int)
        for name, micro in self.balances().items():
            totals[name.split(":", 1)[0]] += micro
        family = GaugeMetricFamily(
            "poi_ledger_total_micro", "sum of balances by account kind", labels=["kind"]
        )
        for kind, micro in sorted(totals.items()):
            family.add_metric([kind], micro)
        yield family


class ServiceMetrics:
    def __init__(self, balances: Callable[[], dict[str, int]], queue_depth: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "poi_http_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.intake = Counter("poi_intake", "receipts handed in, by outcome", ["outcome"], registry=r)
        self.intake_seconds = Histogram(
            "poi_intake_seconds",
            "intake latency (appraisal + settlement)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.layer_seconds = Histogram(
            "poi_appraisal_seconds",
            "appraisal time per layer",
            ["layer"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.verdicts = Counter(
            "poi_verdicts", "verdicts, final or provisional", ["verdict", "final"], registry=r
        )
        self.audit_seconds = Histogram(
            "poi_audit_seconds", "queued L4 audit, run to finalised", buckets=LATENCY_BUCKETS, registry=r
        )
        depth = Gauge("poi_audit_queue_depth", "audits queued in this process", registry=r)
        depth.set_function(queue_depth)
        r.register(WalletTotals(balances))

    def appraised(self, result: AttestationResult, final: bool) -> None:
        for layer in result.layers:
            if layer.status.value != "skipped":
                self.layer_seconds.labels(str(layer.layer)).observe(layer.cost_s)
        self.verdicts.labels(result.verdict.value, str(final).lower()).inc()

    def audited(self, _lease_id: str, verdict: str, seconds: float) -> None:
        self.audit_seconds.observe(seconds)
        self.verdicts.labels(verdict, "true").inc()
