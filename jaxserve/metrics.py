"""Prometheus metric names and the registry of one serving process (no module-global collectors)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                   40.96, 81.92)


class Metrics:
    """Every metric the engine and server export, registered on a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("jaxserve_time_to_first_token_seconds", "Arrival to first generated token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("jaxserve_inter_token_latency_seconds", "Gap between consecutive tokens.",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("jaxserve_e2e_request_latency_seconds", "Arrival to finish.", buckets=LATENCY_BUCKETS,
                             registry=r)
        self.queue_time = Histogram("jaxserve_queue_time_seconds", "Arrival to first scheduled.",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.running = Gauge("jaxserve_requests_running", "Sequences holding KV pages.", registry=r)
        self.waiting = Gauge("jaxserve_requests_waiting", "Sequences queued for admission.", registry=r)
        self.kv_pages_used = Gauge("jaxserve_kv_pages_used", "Device KV pages in use.", registry=r)
        self.kv_pages_total = Gauge("jaxserve_kv_pages_total", "Usable device KV pages.", registry=r)
        self.prompt_tokens = Counter("jaxserve_prompt_tokens", "Prompt tokens of admitted requests.", registry=r)
        self.generation_tokens = Counter("jaxserve_generation_tokens", "Generated tokens.", registry=r)
        self.compilations = Gauge("jaxserve_compilations", "XLA compilations of the step functions so far.",
                                  registry=r)
        self.preemptions = Counter("jaxserve_preemptions", "Sequences preempted for lack of KV pages.", registry=r)
        self.requests_finished = Counter("jaxserve_requests_finished", "Finished requests by reason.",
                                         ["reason"], registry=r)
        self.prefix_cache_queried_tokens = Counter(
            "jaxserve_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache (all but the last).",
            registry=r)
        self.prefix_cache_hit_tokens = Counter("jaxserve_prefix_cache_hit_tokens",
                                               "Prompt tokens served from the KV cache, by tier.", ["tier"], registry=r)
        self.kv_offloaded_bytes = Counter("jaxserve_kv_offloaded_bytes", "KV bytes copied down into a tier.",
                                          ["tier"], registry=r)
        self.kv_onloaded_bytes = Counter("jaxserve_kv_onloaded_bytes", "KV bytes copied up to the device, by source.",
                                         ["tier"], registry=r)
        self.kv_evicted_pages = Counter("jaxserve_kv_evicted_pages", "KV pages evicted from a tier for capacity.",
                                        ["tier"], registry=r)
        self.kv_corrupt_pages = Counter("jaxserve_kv_corrupt_pages",
                                        "Disk KV pages that failed verification (treated as misses).", registry=r)
        self.kv_tier_pages = Gauge("jaxserve_kv_tier_pages", "KV pages held by a cache tier (device: indexed pages).",
                                   ["tier"], registry=r)
        self.kv_tier_capacity_bytes = Gauge("jaxserve_kv_tier_capacity_bytes", "Configured size of a KV tier.",
                                            ["tier"], registry=r)
        self.kv_tier_bytes = Gauge("jaxserve_kv_tier_bytes", "Bytes used in a KV tier (device: pages in use).",
                                   ["tier"], registry=r)
        self.step_failures = Counter("jaxserve_step_failures", "Engine steps that raised.", registry=r)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Exposes the registry over HTTP for Prometheus to scrape."""
        start_http_server(port, addr=host, registry=self.registry)
