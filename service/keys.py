"""Where a client's key is read from, and how it is named in the logs.

The key checks (service.deps) read the key through FastAPI's security
classes, so that the OpenAPI schema declares what is checked; the access log
(service.middleware.Observe) reads it here, by the same rule (a test holds
the two to it): a non-empty X-API-Key, else the credentials of an
``Authorization: Bearer`` header.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from fastapi.security.utils import get_authorization_scheme_param


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key in X-API-Key, else in ``Authorization: Bearer``; None if neither."""
    key = headers.get("x-api-key")
    if key:
        return key
    scheme, credentials = get_authorization_scheme_param(headers.get("authorization"))
    return credentials if scheme.lower() == "bearer" and credentials else None


def key_id(key: str) -> str:
    """The first 8 hex digits of the key's SHA-256: tells keys apart in a log
    without revealing them. An operator finds which key it is with
    ``printf %s "$KEY" | sha256sum | cut -c1-8``. (Keys are long random
    strings, so 32 bits of their hash give nothing away.)"""
    return hashlib.sha256(key.encode()).hexdigest()[:8]
