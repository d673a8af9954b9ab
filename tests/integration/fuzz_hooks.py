"""Schemathesis hooks for tests/integration/test_fuzz_api.py: imported by its
Python-API run and, through SCHEMATHESIS_HOOKS, by its CLI run.

Schemathesis sends raw bytes for application/octet-stream and the image
types it knows (PNG, JPEG, GIF, WebP); the API also takes BMP and TIFF
bodies, which go on the wire the same way.
"""

from __future__ import annotations

import schemathesis

schemathesis.serializer.alias(
    ["image/bmp", "image/x-ms-bmp", "image/tiff"], "application/octet-stream"
)
