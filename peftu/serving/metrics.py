"""The replica's metrics, recorded twice: through Ray's metrics API and in the replica's own registry.

Through `ray.serve.metrics` every series reaches Ray's per-node metrics export
(the `metrics-export-port` of each Ray node, which KubeRay's PodMonitor
scrapes) as `ray_<name>`, tagged by Ray with the deployment, replica and
application (and Ray's own node / session tags): summing over `replica` gives
the fleet. The same series also go to a registry of this replica alone (not
prometheus_client's global one, which Ray's own exporters share), which
`GET /metrics` on the app renders: one replica, whichever the proxy routed the
scrape to; for a quick look, not for scraping. No series has a per-user label
(cardinality).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import Counter as LocalCounter
from prometheus_client import Gauge as LocalGauge
from prometheus_client import Histogram as LocalHistogram
from ray.serve import metrics as ray_metrics

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Series:
    """One series (or one label set of it) in both places, with prometheus_client's call style."""

    def __init__(self, local, remote, tags: dict[str, str] | None = None):
        self._local, self._remote, self._tags = local, remote, tags

    def labels(self, **tags: str) -> Series:
        return Series(self._local.labels(**tags), self._remote, {**(self._tags or {}), **tags})

    def inc(self, amount: float = 1.0) -> None:
        if amount:  # Ray refuses a zero increment
            self._local.inc(amount)
            self._remote.inc(amount, tags=self._tags)

    def observe(self, value: float) -> None:
        self._local.observe(value)
        self._remote.observe(value, tags=self._tags)

    def set(self, value: float) -> None:
        self._local.set(value)
        self._remote.set(value, tags=self._tags)


class Metrics:
    """Requests, latency, tokens, batches, the scheduler's queue and KV use, and the adapter cache."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.names: dict[str, str] = {}
        """Each series' name and kind (counter, gauge, histogram), for the dashboard's test."""
        self.requests = self._counter("peftu_requests", "HTTP requests by endpoint and status code",
                                      ("endpoint", "status"))
        self.latency = self._histogram("peftu_request_latency_seconds", "time to the full answer",
                                       _LATENCY_BUCKETS, ("endpoint",))
        self.tokens = self._counter("peftu_tokens", "tokens read (prompt) and written (completion)", ("kind",))
        self.batch_size = self._histogram("peftu_batch_size", "requests per forward batch", _SIZE_BUCKETS)
        self.batch_users = self._histogram("peftu_batch_users", "distinct adapters per forward batch",
                                           _SIZE_BUCKETS)
        self.adapter_hits = self._counter("peftu_adapter_hits", "requests whose adapter was resident")
        self.adapter_loads = self._counter("peftu_adapter_loads", "adapters loaded from the store")
        self.adapter_evictions = self._counter("peftu_adapter_evictions", "adapters evicted to make room")
        self.adapter_errors = self._counter("peftu_adapter_errors", "adapters that could not be used, by reason",
                                            ("reason",))
        self.load_latency = self._histogram("peftu_adapter_load_seconds", "store fetch + verify + slot fill",
                                            _LATENCY_BUCKETS)
        self.resident = self._gauge("peftu_adapters_resident", "adapters in the bank")
        self.ttft = self._histogram("peftu_time_to_first_token_seconds", "admission to the first generated token",
                                    _LATENCY_BUCKETS)
        self.itl = self._histogram("peftu_inter_token_latency_seconds", "time between a row's successive tokens",
                                   _ITL_BUCKETS)
        self.queue_wait = self._histogram("peftu_queue_wait_seconds", "time a request waited before its first step",
                                          _LATENCY_BUCKETS)
        self.running = self._gauge("peftu_requests_running", "rows in the running batch")
        self.waiting = self._gauge("peftu_requests_waiting", "requests admitted but not yet running")
        self.kv_tokens = self._gauge("peftu_kv_tokens", "KV-cache tokens in use")
        self.kv_allocated = self._gauge("peftu_kv_allocated_tokens", "KV-cache tokens allocated per layer (the slots)")
        self.cancelled = self._counter("peftu_cancelled_requests", "rows stopped because their client went away")
        self.cancelled_tokens = self._counter("peftu_cancelled_tokens", "tokens written by rows that were cancelled")

    def _counter(self, name: str, doc: str, tags: tuple[str, ...] = ()) -> Series:
        self.names[name] = "counter"
        return Series(LocalCounter(name, doc, tags, registry=self.registry),
                      ray_metrics.Counter(name, doc, tag_keys=tags or None))

    def _gauge(self, name: str, doc: str, tags: tuple[str, ...] = ()) -> Series:
        self.names[name] = "gauge"
        return Series(LocalGauge(name, doc, tags, registry=self.registry),
                      ray_metrics.Gauge(name, doc, tag_keys=tags or None))

    def _histogram(self, name: str, doc: str, buckets: tuple[float, ...], tags: tuple[str, ...] = ()) -> Series:
        self.names[name] = "histogram"
        return Series(LocalHistogram(name, doc, tags, buckets=buckets, registry=self.registry),
                      ray_metrics.Histogram(name, doc, boundaries=list(buckets), tag_keys=tags or None))

    def render(self) -> bytes:
        """This replica's series in Prometheus' text format (what GET /metrics shows)."""
        return generate_latest(self.registry)
