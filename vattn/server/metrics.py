"""Prometheus metrics of one server, on a registry of its own (so several apps can live in one process).

Latency histograms and request counters are updated by the engine thread as outputs arrive; engine and
KV-cache figures are read from the latest EngineStats snapshot at scrape time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from vattn.engine import EngineStats

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class _StatsCollector:
    """Turns the engine's latest EngineStats into gauges and counters on every scrape."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def collect(self):
        s = self.metrics.stats
        if s is None:
            return
        kv, label = s.kv, [self.metrics.kv_cache]

        def gauge(name, doc, value, labelled=False):
            g = GaugeMetricFamily(name, doc, labels=["kv_cache"] if labelled else None)
            if labelled:
                g.add_metric(label, value)
            else:
                g.add_metric([], value)
            return g

        def counter(name, doc, value, labelled=False):
            c = CounterMetricFamily(name, doc, labels=["kv_cache"] if labelled else None)
            c.add_metric(label if labelled else [], value)
            return c

        used_units = kv.units_mapped - kv.units_idle
        yield gauge("vattn:num_requests_running", "Sequences in the running batch.", s.num_running)
        yield gauge("vattn:num_requests_waiting", "Sequences waiting to be scheduled.", s.num_waiting)
        yield counter("vattn:num_preemptions", "Sequences preempted so far.", s.num_preemptions)
        yield counter("vattn:prompt_tokens", "Prompt tokens of all admitted requests.", s.prompt_tokens)
        yield counter("vattn:prompt_tokens_cached", "Prompt tokens of ended requests served by the prefix cache.",
                      s.cached_prompt_tokens)
        yield counter("vattn:generation_tokens", "Tokens generated.", s.generation_tokens)
        yield gauge("vattn:kv_cache_pages_total", "Physical KV units (pages or blocks) in the pool.",
                    kv.units_total, True)
        yield gauge("vattn:kv_cache_pages_mapped", "KV units mapped (in use or kept mapped for reuse).",
                    kv.units_mapped, True)
        yield gauge("vattn:kv_cache_pages_used", "KV units owned by live sequences.", used_units, True)
        yield gauge("vattn:kv_cache_pages_idle", "KV units mapped but owned by no sequence (deferred reclamation).",
                    kv.units_idle, True)
        yield gauge("vattn:kv_cache_pages_free", "KV units free in the pool.", kv.units_free, True)
        yield gauge("vattn:kv_cache_page_bytes", "Bytes of one KV unit across all layers.", kv.page_bytes, True)
        yield gauge("vattn:kv_cache_reserved_bytes", "Virtual address space reserved (or pool bytes when paged).",
                    kv.reserved_bytes, True)
        yield gauge("vattn:kv_cache_mapped_bytes", "KV bytes backed by physical memory.", kv.mapped_bytes, True)
        yield gauge("vattn:kv_cache_used_bytes", "KV bytes holding live tokens.", kv.used_bytes, True)
        yield gauge("vattn:kv_cache_live_tokens", "Tokens of running sequences held in the KV cache.",
                    kv.live_tokens, True)
        yield gauge("vattn:kv_cache_usage_perc", "Fraction of KV units owned by live sequences (0..1).",
                    used_units / kv.units_total if kv.units_total else 0.0, True)
        yield counter("vattn:kv_map_seconds", "Seconds spent mapping KV pages.", kv.map_seconds, True)
        yield counter("vattn:kv_map_wait_seconds", "Step time spent waiting for KV mapping.", kv.map_wait_seconds,
                      True)
        yield counter("vattn:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      kv.prefix_cache_queries, True)
        yield counter("vattn:prefix_cache_hits", "Prompt tokens found in the prefix cache.", kv.prefix_cache_hits,
                      True)


class ServerMetrics:
    """All metrics of one server. `render()` gives the Prometheus text exposition."""

    def __init__(self, kv_cache: str):
        self.kv_cache = kv_cache
        self.stats: EngineStats | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ttft = Histogram("vattn:time_to_first_token_seconds", "Time from arrival to the first token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("vattn:inter_token_latency_seconds", "Time between two tokens of one request.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("vattn:e2e_request_latency_seconds", "Time from arrival to the last token.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.step_batch = Histogram("vattn:step_batch_requests", "Requests that progressed in one engine step.",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.request_success = Counter("vattn:request_success", "Finished requests by finish reason.",
                                       ["finished_reason"], registry=r)
        self.request_errors = Counter("vattn:request_errors", "Requests failed by an engine error.", registry=r)
        self.registry.register(_StatsCollector(self))

    def set_stats(self, stats: EngineStats) -> None:
        self.stats = stats

    def render(self) -> bytes:
        return generate_latest(self.registry)
