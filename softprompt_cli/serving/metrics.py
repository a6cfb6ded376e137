"""The server's Prometheus metrics (prometheus-client), in a registry of its own: several servers in one process
(tests) do not share counters."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("softprompt_requests", "HTTP requests answered", ["endpoint", "status"],
                                registry=self.registry)
        self.latency = Histogram("softprompt_request_latency_seconds", "Time from request to full answer",
                                 ["endpoint"], registry=self.registry)
        self.queue_depth = Gauge("softprompt_queue_depth", "Requests waiting to start", registry=self.registry)
        self.running = Gauge("softprompt_running_generations", "Generations decoding now", registry=self.registry)
        self.batch_size = Histogram("softprompt_batch_size", "Rows per forward pass", ["kind"],
                                    buckets=BATCH_SIZES, registry=self.registry)
        self.tokens = Counter("softprompt_generated_tokens", "Tokens generated", registry=self.registry)
        self.prompts = Gauge("softprompt_loaded_prompts", "Soft prompts being served", registry=self.registry)

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def observe_engine(self, waiting: int, running: int) -> None:
        self.queue_depth.set(waiting)
        self.running.set(running)

    def observe_batch(self, kind: str, rows: int) -> None:
        self.batch_size.labels(kind).observe(rows)

    def count_tokens(self, count: int) -> None:
        self.tokens.inc(count)

    def text(self) -> bytes:
        return generate_latest(self.registry)
