"""A stand-in OpenAI-compatible teacher for cases a real server cannot produce on demand: a 429 with Retry-After,
one chosen prompt rejected, a `root` that changes between runs, a teacher that is always right or always wrong.
The window, retries, ledger and manifest under test are the real ones.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from conftest import SERVED_NAME

DEFAULT_ANSWER = "<think>ok</think> \\boxed{1}"


class StandIn:
    """root: what /v1/models reports; rejects prompts containing REJECT with HTTP 400; answers the first
    `throttle_first` chat requests with 429 and Retry-After; `answer(prompt)` is the completion's text (4 tokens
    of usage each), after `delay_s`."""

    def __init__(self, root: str = "/models/a", throttle_first: int = 0, retry_after: str = "1",
                 answer: Callable[[str], str] | None = None, delay_s: float = 0.0):
        self.root, self.throttle_first, self.retry_after = root, throttle_first, retry_after
        self.answer, self.delay_s = answer or (lambda prompt: DEFAULT_ANSWER), delay_s
        self.arrivals: list[tuple[float, str]] = []
        self.in_flight = self.max_in_flight = 0
        lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status: int, body: dict, headers: dict | None = None):
                data = json.dumps(body).encode()
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self.reply(200, {"data": [{"id": SERVED_NAME, "root": stand_in.root, "max_model_len": 1024}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                stand_in.arrivals.append((time.monotonic(), prompt))
                if len(stand_in.arrivals) <= stand_in.throttle_first:
                    return self.reply(429, {"error": "slow down"}, {"Retry-After": stand_in.retry_after})
                if "REJECT" in prompt:
                    return self.reply(400, {"error": "prompt is longer than the model's context"})
                with lock:
                    stand_in.in_flight += 1
                    stand_in.max_in_flight = max(stand_in.max_in_flight, stand_in.in_flight)
                time.sleep(stand_in.delay_s)
                with lock:
                    stand_in.in_flight -= 1
                self.reply(200, {"choices": [{"message": {"content": stand_in.answer(prompt)},
                                              "finish_reason": "stop"}],
                                 "usage": {"prompt_tokens": 5, "completion_tokens": 4}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def sent(self, word: str) -> int:
        return sum(word in prompt for _, prompt in self.arrivals)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
