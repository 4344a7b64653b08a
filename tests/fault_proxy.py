"""A fault-injecting HTTP proxy in front of the real vLLM server.

A real server cannot be made to fail on cue, so this is the one mock in the generate tests: it forwards every
request to the real server, except those its schedule picks, which get a 500, a dropped connection, a stall
past the client's timeout, or (during an outage window) a 503. It also records the Authorization headers it
sees, so a test can check the API key reached the server.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web


@dataclass
class FaultPlan:
    error_500_every: int = 0      # every Nth chat request gets HTTP 500
    reset_every: int = 0          # every Nth has its connection dropped without a response
    stall_every: int = 0          # every Nth stalls for stall_s (longer than the client's timeout)
    stall_s: float = 0.0
    outage: tuple[float, float] | None = None  # (start, end) seconds after the first request: all 503
    refuse_all: bool = False      # every request 503 (an endpoint that keeps failing)
    delay_s: float = 0.0          # every forwarded chat response held this long (a slower replica)


@dataclass
class ProxyStats:
    requests: int = 0
    forwarded: int = 0
    injected: dict = field(default_factory=lambda: {"500": 0, "reset": 0, "stall": 0, "outage": 0, "refused": 0})
    auth_headers: set = field(default_factory=set)


class FaultProxy:
    def __init__(self, upstream: str, plan: FaultPlan):
        self.upstream = upstream.rstrip("/")  # e.g. http://127.0.0.1:1234/v1
        self.plan = plan
        self.stats = ProxyStats()
        self._first_request: float | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "FaultProxy":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600))
        app = web.Application()
        app.router.add_route("*", "/v1/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        await self._runner.cleanup()
        await self._session.close()

    def _pick_fault(self, count: int) -> str | None:
        plan = self.plan
        if plan.refuse_all:
            return "refused"
        if plan.outage is not None:
            elapsed = time.monotonic() - self._first_request
            if plan.outage[0] <= elapsed < plan.outage[1]:
                return "outage"
        for name, every in (("500", plan.error_500_every), ("reset", plan.reset_every),
                            ("stall", plan.stall_every)):
            if every and count % every == 0:
                return name
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if request.path.endswith("/chat/completions"):
            self.stats.requests += 1
            if self._first_request is None:
                self._first_request = time.monotonic()
            if "Authorization" in request.headers:
                self.stats.auth_headers.add(request.headers["Authorization"])
            fault = self._pick_fault(self.stats.requests)
            if fault is not None:
                self.stats.injected[fault] += 1
                return await self._inject(fault, request)
        return await self._forward(request, body)

    async def _inject(self, fault: str, request: web.Request) -> web.StreamResponse:
        if fault == "500":
            return web.json_response({"error": "injected"}, status=500)
        if fault in ("outage", "refused"):
            return web.json_response({"error": "unavailable"}, status=503)
        if fault == "reset":
            request.transport.close()  # drop the connection with no response
            return web.Response(status=500)
        await asyncio.sleep(self.plan.stall_s)
        return web.json_response({"error": "stalled"}, status=504)

    async def _forward(self, request: web.Request, body: bytes) -> web.Response:
        tail = request.match_info["tail"]
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        async with self._session.request(request.method, f"{self.upstream}/{tail}", data=body,
                                         headers=headers) as upstream:
            payload = await upstream.read()
            self.stats.forwarded += 1
        if self.plan.delay_s and tail.endswith("chat/completions"):
            await asyncio.sleep(self.plan.delay_s)
        return web.Response(body=payload, status=upstream.status, content_type="application/json")
