"""Prometheus metrics of one replica, served at GET /metrics.

Each replica has its own registry (not prometheus_client's global one, which
Ray's own exporters share), so `/metrics` shows exactly this server's series.
Ray Serve adds its own per-deployment series (`serve_multiplexed_*`, request
counts and latencies) on Ray's metrics port.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class Metrics:
    """Requests, latency, tokens, batches, the scheduler's queue and KV use, and the adapter cache."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Counter("peftu_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=reg)
        self.latency = Histogram("peftu_request_latency_seconds", "time to the full answer",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS, registry=reg)
        self.tokens = Counter("peftu_tokens", "tokens read (prompt) and written (completion)",
                              ["kind"], registry=reg)
        self.batch_size = Histogram("peftu_batch_size", "requests per forward batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=reg)
        self.batch_users = Histogram("peftu_batch_users", "distinct adapters per forward batch",
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=reg)
        self.adapter_hits = Counter("peftu_adapter_hits", "requests whose adapter was resident", registry=reg)
        self.adapter_loads = Counter("peftu_adapter_loads", "adapters loaded from the store", registry=reg)
        self.adapter_evictions = Counter("peftu_adapter_evictions", "adapters evicted to make room",
                                         registry=reg)
        self.adapter_errors = Counter("peftu_adapter_errors", "adapters that could not be used, by reason",
                                      ["reason"], registry=reg)
        self.load_latency = Histogram("peftu_adapter_load_seconds", "store fetch + verify + slot fill",
                                      buckets=_LATENCY_BUCKETS, registry=reg)
        self.resident = Gauge("peftu_adapters_resident", "adapters in the bank", registry=reg)
        self.ttft = Histogram("peftu_time_to_first_token_seconds", "admission to the first generated token",
                              buckets=_LATENCY_BUCKETS, registry=reg)
        self.itl = Histogram("peftu_inter_token_latency_seconds", "time between a row's successive tokens",
                             buckets=_ITL_BUCKETS, registry=reg)
        self.queue_wait = Histogram("peftu_queue_wait_seconds", "time a request waited before its first step",
                                    buckets=_LATENCY_BUCKETS, registry=reg)
        self.running = Gauge("peftu_requests_running", "rows in the running batch", registry=reg)
        self.waiting = Gauge("peftu_requests_waiting", "requests admitted but not yet running", registry=reg)
        self.kv_tokens = Gauge("peftu_kv_tokens", "KV-cache tokens in use", registry=reg)

    def render(self) -> bytes:
        return generate_latest(self.registry)
