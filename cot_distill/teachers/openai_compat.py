"""A teacher behind any OpenAI-compatible chat endpoint (vLLM's first), over aiohttp.

Errors are sorted into transient (retry: 408/409/425/429/5xx, connection errors, timeouts, malformed replies) and
permanent (other 4xx: retrying cannot help). A 429 or 503 may say when to come back (Retry-After, seconds or an
HTTP date); the error carries it. Endpoints are chosen by fewest outstanding requests; one that
keeps failing is ejected for a cool-down and comes back half-open (one more failure ejects it again).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import aiohttp

from cot_distill.reasoning import join_reasoning, split_reasoning
from cot_distill.records import Completion

RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
RETRY_AFTER_STATUS = {429, 503}  # where RFC 9110 and rate-limiting gateways send Retry-After


class TransientError(Exception):
    def __init__(self, message: str, *, status: int | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s  # what the server asked us to wait, when it said


class PermanentError(Exception):
    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        self.status = status


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delay-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())


class AllEndpointsDown(RuntimeError):
    pass


@dataclass
class Endpoint:
    base_url: str
    outstanding: int = 0
    consecutive_failures: int = 0
    ejected_until: float = 0.0
    ejections: int = 0
    successes: int = 0
    failures: int = 0


@dataclass
class EndpointPool:
    endpoints: list[Endpoint]
    eject_after_failures: int
    eject_cooldown_s: float
    give_up_after_s: float
    last_success: float = field(default_factory=time.monotonic)

    @classmethod
    def from_urls(cls, urls: list[str], **kwargs: float) -> "EndpointPool":
        return cls([Endpoint(url.rstrip("/")) for url in urls], **kwargs)

    async def acquire(self) -> Endpoint:
        """The live endpoint with the fewest outstanding requests; waits while every endpoint cools down."""
        while True:
            now = time.monotonic()
            live = [ep for ep in self.endpoints if ep.ejected_until <= now]
            if live:
                chosen = min(live, key=lambda ep: ep.outstanding)
                chosen.outstanding += 1
                return chosen
            if now - self.last_success > self.give_up_after_s:
                raise AllEndpointsDown(
                    f"every teacher endpoint has been failing for over {self.give_up_after_s:.0f} s: "
                    + ", ".join(ep.base_url for ep in self.endpoints))
            wake = min(ep.ejected_until for ep in self.endpoints)
            await asyncio.sleep(max(0.05, min(wake - now, 5.0)))

    def release(self, endpoint: Endpoint, *, failed: bool | None) -> None:
        """failed=None: the endpoint answered, but not with a sample (a permanent 4xx, a 429 with Retry-After);
        that says nothing about its health, so it neither ejects nor resets it."""
        endpoint.outstanding -= 1
        if failed is None:
            return
        if not failed:
            endpoint.successes += 1
            endpoint.consecutive_failures = 0
            self.last_success = time.monotonic()
            return
        endpoint.failures += 1
        endpoint.consecutive_failures += 1
        if endpoint.consecutive_failures >= self.eject_after_failures:
            endpoint.ejected_until = time.monotonic() + self.eject_cooldown_s
            endpoint.ejections += 1
            # Half-open on return: a single further failure ejects it again.
            endpoint.consecutive_failures = self.eject_after_failures - 1

    def pause(self, endpoint: Endpoint, seconds: float) -> None:
        """Send nothing to `endpoint` for `seconds` (it asked us to wait: Retry-After)."""
        endpoint.ejected_until = max(endpoint.ejected_until, time.monotonic() + seconds)

    def live_count(self) -> int:
        now = time.monotonic()
        return sum(ep.ejected_until <= now for ep in self.endpoints)


def build_request_body(model: str, messages: list[dict[str, str]], params: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": messages, "n": 1}
    for key in ("temperature", "top_p", "max_tokens", "seed", "stop"):
        if params.get(key) is not None:
            body[key] = params[key]
    if params.get("logprobs"):  # generate.logprobs: every token's id and the top-K, as ids, not strings
        body.update(logprobs=True, top_logprobs=params["logprobs"], return_tokens_as_token_ids=True)
    body.update(params.get("extra_body") or {})
    return body


TOKEN_ID_PREFIX = "token_id:"  # how vLLM writes a token under return_tokens_as_token_ids


def _token_id(entry: dict[str, Any]) -> int:
    token = entry.get("token")
    if not (isinstance(token, str) and token.startswith(TOKEN_ID_PREFIX)):
        raise PermanentError(f"generate.logprobs needs token ids (vLLM's return_tokens_as_token_ids), and the server "
                             f"returned the token {str(token)[:40]!r}: this endpoint cannot record logprobs")
    return int(token[len(TOKEN_ID_PREFIX):])


def parse_logprobs(choice: dict[str, Any], k: int, completion_tokens: int):
    """The choice's logprobs.content as a TokenLogprobs: per token its id and the top_logprobs entries (vLLM lists
    the sampled token first, then the top ones: K entries holding the sampled token and the top K, or K - 1 when the
    sampled token is outside them). A server that sends none cannot record them on any request: PermanentError."""
    from cot_distill.logprob_store import TokenLogprobs

    content = (choice.get("logprobs") or {}).get("content")
    if content is None and completion_tokens:
        raise PermanentError("generate.logprobs is set and the server returned no logprobs: it does not support "
                             "logprobs/top_logprobs on chat completions")
    try:
        token_ids = [_token_id(entry) for entry in content or ()]
        topk = [[(_token_id(alt), float(alt["logprob"])) for alt in entry.get("top_logprobs") or ()]
                for entry in content or ()]
    except (KeyError, TypeError, ValueError, AttributeError):
        raise TransientError(f"malformed logprobs in the response: {str(content)[:200]}") from None
    return TokenLogprobs.from_lists(token_ids, topk, k)


def parse_completion(data: Any, logprobs: int | None = None) -> Completion:
    """The first choice of a chat completion; with `logprobs` (K) its recorded top-K as well."""
    try:
        choice = data["choices"][0]
        message = choice["message"]
    except (KeyError, IndexError, TypeError):
        raise TransientError(f"malformed response: {str(data)[:200]}") from None
    content = message.get("content") or ""
    finish_reason = choice.get("finish_reason")
    # vLLM's reasoning parsers put the block in `reasoning_content` (older) or `reasoning` (newer).
    server_reasoning = message.get("reasoning_content") or message.get("reasoning")
    if server_reasoning is not None and logprobs:
        # The recorded tokens are the raw completion; text re-joined from the parser's fields need not decode from
        # them (a template that opens <think> in the prompt, a trace cut before </think>).
        raise PermanentError("generate.logprobs records the raw completion, and this server splits the reasoning "
                             "out (vLLM --reasoning-parser): serve the teacher without it (cot-distill splits "
                             "<think> blocks itself)")
    if server_reasoning is not None:
        closed = bool(content) or finish_reason != "length"
        text = join_reasoning(server_reasoning, content)
        reasoning, answer = server_reasoning, content
    else:
        reasoning, answer, closed = split_reasoning(content)
        text = content
    usage = data.get("usage") or {}
    completion_tokens = int(usage.get("completion_tokens") or 0)
    return Completion(
        text=text,
        reasoning=reasoning,
        content=answer,
        reasoning_closed=closed,
        finish_reason=finish_reason,
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=completion_tokens,
        logprobs=parse_logprobs(choice, logprobs, completion_tokens) if logprobs else None,
    )


class OpenAICompatClient:
    def __init__(self, model: str, api_key: str | None, request_timeout_s: float, max_connections: int):
        self.model = model
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "OpenAICompatClient":
        connector = aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0, force_close=False)
        self._session = aiohttp.ClientSession(connector=connector, headers=self._headers, timeout=self._timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def complete(self, base_url: str, messages: list[dict[str, str]], params: dict[str, Any]) -> Completion:
        assert self._session is not None, "use the client as an async context manager"
        body = build_request_body(self.model, messages, params)
        try:
            async with self._session.post(f"{base_url}/chat/completions", json=body) as response:
                payload = await response.read()
                if response.status != 200:
                    raise status_error(response.status, payload, response.headers.get("Retry-After"))
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
            raise TransientError(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from None
        try:
            data = json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise TransientError(f"malformed response body: {payload[:200]!r}") from None
        return parse_completion(data, params.get("logprobs"))

    async def served_models(self, base_url: str, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        """The entries of GET /models (id, and on vLLM root and max_model_len); TransientError when unreachable."""
        assert self._session is not None
        try:
            async with self._session.get(f"{base_url}/models",
                                         timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
                if response.status != 200:
                    raise TransientError(f"HTTP {response.status}")
                data = await response.json()
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError, ValueError) as exc:
            raise TransientError(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from None
        return [entry for entry in data.get("data", []) if isinstance(entry, dict)]


def status_error(status: int, payload: bytes, retry_after: str | None) -> TransientError | PermanentError:
    error = f"HTTP {status}: {payload[:300].decode('utf-8', 'replace')}"
    if status not in RETRYABLE_STATUS:
        return PermanentError(error, status=status)
    wait = parse_retry_after(retry_after) if status in RETRY_AFTER_STATUS else None
    return TransientError(error, status=status, retry_after_s=wait)
