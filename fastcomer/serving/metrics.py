"""The service's Prometheus metrics (prometheus_client). With several worker processes,
`fastcomer serve` sets PROMETHEUS_MULTIPROC_DIR before they start, so that every worker
writes its values there and /metrics (answered by any worker) sums them."""
import os
from typing import Tuple

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess

REQUESTS = Counter("fastcomer_requests_total", "Recognition requests answered, by HTTP status", ["status"])
LATENCY = Histogram("fastcomer_request_seconds", "Recognition requests' time from arrival to answer",
                    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0))
QUEUE = Gauge("fastcomer_queue_depth", "Images waiting to join the running batch", multiprocess_mode="livesum")
RUNNING = Gauge("fastcomer_running_images", "Images decoding in the running batch", multiprocess_mode="livesum")
STEP_ROWS = Histogram("fastcomer_step_rows", "Rows (beams) per decoding step",
                      buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
STEPS = Counter("fastcomer_decode_steps_total", "Decoding steps run (steps per second: its rate)")
STEP_SECONDS = Histogram("fastcomer_step_seconds", "Time of one decoding step",
                         buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0))


def observe_step(rows: int, seconds: float) -> None:
    STEPS.inc()
    STEP_ROWS.observe(rows)
    STEP_SECONDS.observe(seconds)


def exposition() -> Tuple[bytes, str]:
    """The metrics in Prometheus' text format, every worker's when they share a directory."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def process_exits() -> None:
    """This worker's live gauges leave the sums (at a clean exit)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(os.getpid())
