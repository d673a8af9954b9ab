"""A lean HTTP/1.1 load generator: one asyncio loop, raw keep-alive sockets.

Client and server share this machine's two cores, so every core-millisecond
the client spends is taken from the server it measures. A thread per client
with httpx costs about as much CPU per request as the server's PNG decode;
this generator writes a request prepared once and reads the answer by its
Content-Length, on one thread, and leaves the cores to the server.

Two ways to drive the server:

* :func:`closed_loop`: N clients, each posting again as soon as it has its
  answer (throughput at a given concurrency).
* :func:`open_loop`: requests offered on a fixed schedule at a given rate,
  whatever the answers do. Latency counts from the time a request was *due*,
  not from when it was sent, so a stalled server cannot hide its queue by
  slowing the client down (coordinated omission, as wrk2 corrects it).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

Tick = Callable[[float], None]


def build_request(host: str, path: str, body: bytes, content_type: str) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return head.encode("ascii") + body


class Connection:
    """One keep-alive connection that sends a prepared request and reads the answer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.last_used = time.perf_counter()

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def exchange(self, request: bytes) -> tuple[int, bool]:
        """(status code, whether the server keeps the connection open)."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length, keep = 0, True
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                keep = False
        await self.reader.readexactly(length)
        self.last_used = time.perf_counter()
        return status, keep

    def close(self) -> None:
        self.writer.close()


@dataclass
class Result:
    latencies_ms: list[float] = field(default_factory=list)  # of the 200 answers
    started_s: list[float] = field(default_factory=list)  # when each of them started, from t0
    codes: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # connection-level failures
    wall_s: float = 0.0
    t0: float = field(default_factory=time.perf_counter)

    def record(self, status: int, started: float) -> None:
        self.codes[status] += 1
        if status == 200:
            self.latencies_ms.append((time.perf_counter() - started) * 1000)
            self.started_s.append(started - self.t0)


class Target:
    """Where and what to post."""

    def __init__(
        self, base: str, body: bytes, path: str = "/v1/inspect", content_type: str = "image/png"
    ) -> None:
        url = urlsplit(base)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or 80
        self.request = build_request(f"{self.host}:{self.port}", path, body, content_type)

    async def connect(self) -> Connection:
        return await Connection.open(self.host, self.port)


async def _closed_loop(target: Target, clients: int, seconds: float, max_requests: int) -> Result:
    result = Result()
    stop = time.perf_counter() + seconds
    budget = [max_requests]

    async def client() -> None:
        conn = await target.connect()
        try:
            while time.perf_counter() < stop and budget[0] > 0:
                budget[0] -= 1
                started = time.perf_counter()
                try:
                    status, keep = await conn.exchange(target.request)
                except (OSError, asyncio.IncompleteReadError) as exc:
                    result.errors[type(exc).__name__] += 1
                    conn.close()
                    conn = await target.connect()
                    continue
                result.record(status, started)
                if not keep:
                    conn.close()
                    conn = await target.connect()
        finally:
            conn.close()

    t0 = result.t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    result.wall_s = time.perf_counter() - t0
    return result


# Idle connections older than this are closed, not reused: safely under the
# server's keep-alive timeout (5 s by default), so the client never writes to
# a connection the server is closing at that moment.
POOL_IDLE_S = 2.0


async def _open_loop(
    target: Target, rate: float, seconds: float, on_tick: Tick | None, max_in_flight: int
) -> Result:
    result = Result()
    idle: list[Connection] = []
    pending: set[asyncio.Task[None]] = set()

    async def connection() -> Connection:
        while idle:
            conn = idle.pop()
            if time.perf_counter() - conn.last_used < POOL_IDLE_S:
                return conn
            conn.close()
        return await target.connect()

    async def one(due: float) -> None:
        conn = await connection()
        try:
            status, keep = await conn.exchange(target.request)
        except (OSError, asyncio.IncompleteReadError) as exc:
            result.errors[type(exc).__name__] += 1
            conn.close()
            return
        result.record(status, due)
        if keep:
            idle.append(conn)
        else:
            conn.close()

    t0 = result.t0 = time.perf_counter()
    n = 0
    while (due := t0 + n / rate) < t0 + seconds:
        if (wait := due - time.perf_counter()) > 0:
            await asyncio.sleep(wait)
        n += 1
        if len(pending) >= max_in_flight:
            # A server this far behind has failed the run already; the client
            # stays bounded instead of opening connections without end.
            result.errors["client_in_flight_limit"] += 1
            continue
        task = asyncio.create_task(one(due))
        pending.add(task)
        task.add_done_callback(pending.discard)
        if on_tick is not None:
            on_tick(time.perf_counter() - t0)
    if pending:
        await asyncio.wait(pending)
    result.wall_s = time.perf_counter() - t0
    for conn in idle:
        conn.close()
    return result


def closed_loop(
    target: Target, clients: int, seconds: float, max_requests: int = 1_000_000
) -> Result:
    """N clients posting back to back for ``seconds`` (or ``max_requests`` in all)."""
    return asyncio.run(_closed_loop(target, clients, seconds, max_requests))


def open_loop(
    target: Target,
    rate: float,
    seconds: float,
    on_tick: Tick | None = None,
    max_in_flight: int = 512,
) -> Result:
    """Requests due every 1/rate s for ``seconds``; ``on_tick(elapsed_s)`` after each send."""
    return asyncio.run(_open_loop(target, rate, seconds, on_tick, max_in_flight))
