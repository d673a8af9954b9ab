"""Prometheus metrics: units in the names, labels {model, version}, no unbounded labels.

One registry per app (not the global one), so several apps can live in one
process (tests) without colliding. Latency is split like Triton's: queue
time and inference time apart, so an operator tells a slow model from a full
queue.
"""

from __future__ import annotations

from collections.abc import Sequence

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
# Good parts score in [0, 1]: steps of 0.05 let histogram_quantile read their
# median to within a bucket and the share near the threshold (drift alerts).
GOOD_SCORE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))


class Metrics:
    def __init__(self, near_threshold: float = 0.8) -> None:
        # A good part scoring at or above this fraction of the threshold is
        # counted as near it (settings.near_threshold).
        self.near_threshold_fraction = near_threshold
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
            "inspection_request_duration_seconds",
            "Time from request received to response (not of scrapes and probes).",
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
        self.padded_images = Counter(
            "inspection_padded_images",
            "Copies added to fill a batch up to its planned size (service/batch_shapes.py).",
            MODEL, registry=r,
        )  # fmt: skip
        self.in_flight = Gauge(
            "inspection_in_flight_requests",
            "Requests being handled now, scrapes and probes not counted (0 at idle).",
            registry=r,
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
        self.good_score = Histogram(
            "inspection_good_score",
            "Rule score max(e0/eps0, ek/epsk) of images judged defect-free (1 is the threshold).",
            MODEL, buckets=GOOD_SCORE_BUCKETS, registry=r,
        )  # fmt: skip
        self.near_threshold = Counter(
            "inspection_near_threshold_images",
            "Defect-free images whose rule score is at or above the near-threshold fraction.",
            MODEL, registry=r,
        )  # fmt: skip
        self.reference_score = Gauge(
            "inspection_calibration_reference_score",
            "Median rule score of the calibration images: the drift baseline.",
            MODEL, registry=r,
        )  # fmt: skip
        self.codec_mismatch = Counter(
            "inspection_codec_mismatch_images",
            "Inspected images encoded otherwise than the thresholds were calibrated for, "
            "by the format seen.",
            (*MODEL, "format"), registry=r,
        )  # fmt: skip
        self.model_info = Gauge(
            "inspection_model_info", "The model being served (value 1).",
            (*MODEL, "family", "sha256", "provider"), registry=r,
        )  # fmt: skip
        self.provider_fallback = Gauge(
            "inspection_execution_provider_fallback",
            "1 when the session runs on another execution provider than the first one "
            "requested (INSPECTION_PROVIDERS), 0 when on that one.",
            (*MODEL, "requested", "provider"), registry=r,
        )  # fmt: skip
        self.reloads = Counter(
            "inspection_model_reloads", "Model reloads by result.", ("result",), registry=r
        )
        for result in ("success", "failure"):
            self.reloads.labels(result)

    def observe_good(self, model: str, version: str, score: float) -> None:
        """Record the rule score of an image judged defect-free (drift watch)."""
        self.good_score.labels(model, version).observe(score)
        if score >= self.near_threshold_fraction:
            self.near_threshold.labels(model, version).inc()

    def provider_in_use(
        self, model: str, version: str, requested: Sequence[str], provider: str
    ) -> None:
        """The model version in service runs on ``provider``; ``requested`` is
        INSPECTION_PROVIDERS in order. Anything but its first (CUDA by default)
        is a fallback: onnxruntime skips a provider it cannot start without an
        error, so a GPU box with a broken driver or CUDA libraries would
        otherwise serve slowly on the CPU and say nothing (alert
        InspectionProviderFallback). One series, for the version in service."""
        first = requested[0] if requested else provider
        self.provider_fallback.clear()
        self.provider_fallback.labels(model, version, first, provider).set(int(provider != first))

    def model_installed(
        self, model: str, version: str, reference_score: float | None, old: tuple[str, str] | None
    ) -> None:
        """A model version went into service, replacing ``old`` (model, version).

        Its drift series start at zero, so rates and ratios read 0 rather than
        nothing before the first good part; the reference score follows the
        version in service, as inspection_model_info does, and is absent for
        artifacts calibrated without one.
        """
        if old is not None:
            self.reference_score.remove(*old)
        self.good_score.labels(model, version)
        self.near_threshold.labels(model, version)
        if reference_score is not None:
            self.reference_score.labels(model, version).set(reference_score)
