"""Prometheus metrics: units in the names, labels {model, version}, no unbounded labels.

One registry per app (not the global one), so several apps can live in one
process (tests) without colliding. Latency is split like Triton's: queue
time and inference time apart, so an operator tells a slow model from a full
queue.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

MODEL = ("model", "version")
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.035,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
SCORE_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "inspection_requests", "HTTP requests by endpoint and status code.",
            (*MODEL, "endpoint", "status"), registry=r,
        )  # fmt: skip
        self.verdicts = Counter(
            "inspection_verdicts", "Inspected images by verdict.", (*MODEL, "verdict"), registry=r
        )
        self.request_duration = Histogram(
            "inspection_request_duration_seconds", "Time from request received to response.",
            (*MODEL, "endpoint"), buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_duration = Histogram(
            "inspection_queue_duration_seconds", "Time an image waited for its batch to run.",
            MODEL, buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.inference_duration = Histogram(
            "inspection_inference_duration_seconds", "onnxruntime time of an image's batch.",
            MODEL, buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.decode_duration = Histogram(
            "inspection_decode_duration_seconds", "Decode, resize and normalise time per image.",
            MODEL, buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "inspection_batch_size", "Images per onnxruntime run.", MODEL,
            buckets=(1, 2, 4, 8, 16, 32, 64), registry=r,
        )  # fmt: skip
        self.in_flight = Gauge(
            "inspection_in_flight_requests", "Requests being handled now.", registry=r
        )
        self.queue_depth = Gauge(
            "inspection_queue_depth", "Images waiting for a batch now.", MODEL, registry=r
        )
        self.rejected = Counter(
            "inspection_rejected_inputs", "Inputs refused, by reason.", ("reason",), registry=r
        )
        self.image_score = Histogram(
            "inspection_image_score", "Whole-image score e0/eps0 (1 is the threshold).",
            MODEL, buckets=SCORE_BUCKETS, registry=r,
        )  # fmt: skip
        self.tile_score = Histogram(
            "inspection_tile_score", "Tile score ek/epsk by tile 1..9 (1 is the threshold).",
            (*MODEL, "tile"), buckets=SCORE_BUCKETS, registry=r,
        )  # fmt: skip
        self.model_info = Gauge(
            "inspection_model_info", "The model being served (value 1).",
            (*MODEL, "family", "sha256", "provider"), registry=r,
        )  # fmt: skip
        self.reloads = Counter(
            "inspection_model_reloads", "Model reloads by result.", ("result",), registry=r
        )
        for result in ("success", "failure"):
            self.reloads.labels(result)
