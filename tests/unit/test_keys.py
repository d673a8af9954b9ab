"""The access log names the key the checks read: service.keys.presented_key
and the security schemes of service.deps agree on every header combination."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request

from service.deps import _presented, client_bearer, client_key
from service.keys import presented_key

CASES = [
    {},
    {"x-api-key": "k1"},
    {"x-api-key": ""},
    {"x-api-key": "k1", "authorization": "Bearer k2"},
    {"x-api-key": "", "authorization": "Bearer k2"},
    {"authorization": "bearer  k2 "},
    {"authorization": "Bearer"},
    {"authorization": "Bearer "},
    {"authorization": "Basic k2"},
    {"authorization": "BEARER k3"},
]


@pytest.mark.parametrize("headers", CASES, ids=[str(c) for c in CASES])
def test_the_log_and_the_check_read_the_same_key(headers: dict[str, str]) -> None:
    scope = {
        "type": "http",
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
    }
    request = Request(scope)

    async def checked() -> str | None:
        return _presented(await client_key(request), await client_bearer(request))

    assert presented_key(headers) == asyncio.run(checked())
