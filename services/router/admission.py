"""Admission control for the router: API keys, per-key rate limits shared through Redis, a bounded local queue.

Nothing here imports FastAPI: every refusal is an :class:`AdmissionError` carrying the HTTP status, an
OpenAI-style ``code`` and, for 429, ``retry_after_s``; the handlers turn it into a response.

- :class:`ApiKeys`: who may call. Keys are never logged or stored elsewhere; callers get a *key id*, a short
  stable digest, to use in logs and as the rate-limit identity.
- :class:`RateLimiter`: requests-per-window and tokens-per-window per key id, enforced as ONE limit by every
  router replica through a single atomic Lua script. Redis being down lets requests through (fail open).
- :class:`AdmissionQueue`: at most ``max_running`` requests in flight per router, at most ``max_waiting``
  waiting for a slot (FIFO), the rest refused at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import os
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import NamedTuple

import redis.asyncio as aioredis

from common.coord.redis_client import REDIS_ERRORS, OutageLog

logger = logging.getLogger(__name__)

ANONYMOUS = "anonymous"
ENV_KEYS = "TANDEM_API_KEYS"
ENV_KEYS_FILE = "TANDEM_API_KEYS_FILE"
KEY_ID_HEX_CHARS = 16  # 64 bits of sha256: stable, short, and no help in guessing the key


class AdmissionError(Exception):
    """A request refused before any work was done.

    Invariants: ``retry_after_s`` is None unless ``status == 429``, and then it is an int >= 1;
    ``param`` is always None (kept for the OpenAI error shape).
    """

    def __init__(self, status: int, message: str, code: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        if status == 429:
            retry_after_s = max(1, int(retry_after_s or 1))
        else:
            retry_after_s = None
        self.status = status
        self.message = message
        self.code = code
        self.retry_after_s = retry_after_s
        self.param: str | None = None

    @property
    def error_type(self) -> str:
        """The OpenAI ``type`` field for this status."""
        return {401: "authentication_error", 429: "rate_limit_error"}.get(self.status, "invalid_request_error")

    def body(self) -> dict[str, dict[str, object]]:
        """The JSON body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        """Response headers: ``Retry-After`` for 429, ``WWW-Authenticate`` for 401."""
        if self.retry_after_s is not None:
            return {"Retry-After": str(self.retry_after_s)}
        if self.status == 401:
            return {"WWW-Authenticate": "Bearer"}
        return {}

    def __repr__(self) -> str:
        return (f"AdmissionError({self.status}, {self.message!r}, code={self.code!r}, "
                f"retry_after_s={self.retry_after_s})")


# ----------------------------------------------------------------------------------------------------- API keys


def key_id(key: str) -> str:
    """A short stable digest of an API key, safe for logs and Redis key names (never the key itself)."""
    return hashlib.sha256(key.encode()).hexdigest()[:KEY_ID_HEX_CHARS]


def _unauthorized(message: str) -> AdmissionError:
    return AdmissionError(401, message, code="invalid_api_key")


def _parse_keys(text: str, separators: str) -> list[str]:
    """Keys split on any of ``separators``; blanks and ``#`` comment lines are dropped."""
    for separator in separators[1:]:
        text = text.replace(separator, separators[0])
    return [part.strip() for part in text.split(separators[0]) if part.strip() and not part.strip().startswith("#")]


class ApiKeys:
    """The set of accepted API keys; empty means authentication is off.

    Invariants: only sha256 digests of the keys are kept; :meth:`check` compares against every configured key
    with :func:`hmac.compare_digest` (no early exit), so its timing reveals neither the key nor which one matched.
    """

    def __init__(self, keys: Iterable[str] = ()) -> None:
        cleaned = {key.strip() for key in keys if key.strip()}
        if any(any(ch.isspace() for ch in key) for key in cleaned):
            raise ValueError("API keys must not contain whitespace")
        self._digests = [(hashlib.sha256(key.encode()).digest(), key_id(key)) for key in sorted(cleaned)]

    @classmethod
    def load(cls, keys: Iterable[str] = (), keys_file: str | os.PathLike[str] | None = None,
             environ: Mapping[str, str] | None = None) -> ApiKeys:
        """Keys from ``keys``, ``keys_file`` and the environment together (their union).

        ``TANDEM_API_KEYS`` is comma separated; ``TANDEM_API_KEYS_FILE`` (or ``keys_file``) names a file with
        keys separated by newlines or commas, ``#`` lines ignored. A named file that is missing or holds no key
        raises ValueError: someone asked for authentication, so starting without it would fail open.
        """
        environ = os.environ if environ is None else environ
        found = list(keys) + _parse_keys(environ.get(ENV_KEYS, ""), ",")
        for path in (keys_file, environ.get(ENV_KEYS_FILE) or None):
            if path is not None:
                found += cls._read_file(Path(path))
        return cls(found)

    @staticmethod
    def _read_file(path: Path) -> list[str]:
        try:
            keys = _parse_keys(path.read_text(), "\n,")
        except OSError as error:
            raise ValueError(f"cannot read API keys file {path}: {error}") from error
        if not keys:
            raise ValueError(f"API keys file {path} holds no key")
        return keys

    @property
    def enabled(self) -> bool:
        """True iff at least one key is configured (otherwise every request passes as ``anonymous``)."""
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def check(self, authorization_header: str | None) -> str:
        """The caller's key id, or ``"anonymous"`` when no keys are configured.

        Raises AdmissionError(401, code="invalid_api_key") when keys are configured and the header is missing,
        is not ``Bearer <key>``, or carries a key that is not configured.
        """
        if not self._digests:
            return ANONYMOUS
        presented = self._bearer_token(authorization_header)
        digest = hashlib.sha256(presented.encode()).digest()
        matched: str | None = None
        for candidate, candidate_id in self._digests:  # all of them, always
            if hmac.compare_digest(digest, candidate):
                matched = candidate_id
        if matched is None:
            raise _unauthorized("Incorrect API key provided.")
        return matched

    @staticmethod
    def _bearer_token(header: str | None) -> str:
        if header is None or not header.strip():
            raise _unauthorized("Missing API key: send an 'Authorization: Bearer <key>' header.")
        parts = header.split()
        if len(parts) != 2 or parts[0].lower() != "bearer":
            raise _unauthorized("Malformed Authorization header: expected 'Bearer <key>'.")
        return parts[1]


# ------------------------------------------------------------------------------------------------- rate limits

# Two token buckets (requests, tokens) in one hash per key id: fields r, t (levels) and ts (ms, Redis clock).
# A bucket of capacity C refills continuously at C per window, up to C. A missing hash means full buckets.
# KEYS[1]: the hash. ARGV: req_cap, tok_cap (0 = no limit), window_ms, req_cost, tok_cost, force ('1' = charge
# without checking, for completion tokens counted after the fact; levels may go negative: a debt).
# Returns {wait_ms_requests, wait_ms_tokens}: both 0 iff admitted (and charged); otherwise nothing is written.
# The hash expires when both buckets would be full again, so an expired key and a stored one mean the same.
_BUCKET_SCRIPT = """
local now_t = redis.call('TIME')
local now = tonumber(now_t[1]) * 1000 + math.floor(tonumber(now_t[2]) / 1000)
local req_cap, tok_cap = tonumber(ARGV[1]), tonumber(ARGV[2])
local window_ms = tonumber(ARGV[3])
local req_cost, tok_cost = tonumber(ARGV[4]), tonumber(ARGV[5])
local force = ARGV[6] == '1'
local state = redis.call('HMGET', KEYS[1], 'r', 't', 'ts')
local elapsed = math.max(0, now - (tonumber(state[3]) or now))
local function level(stored, cap)
  if cap <= 0 then return 0 end
  if stored == nil then return cap end
  return math.min(cap, stored + elapsed * cap / window_ms)
end
local function wait_ms(lvl, cap, cost)
  if cap <= 0 or force then return 0 end
  local need = math.min(cost, cap)  -- a cost above capacity passes when the bucket is full, leaving a debt
  if lvl >= need then return 0 end
  return math.max(1, math.ceil((need - lvl) * window_ms / cap))
end
local r = level(tonumber(state[1]), req_cap)
local t = level(tonumber(state[2]), tok_cap)
local wait_r, wait_t = wait_ms(r, req_cap, req_cost), wait_ms(t, tok_cap, tok_cost)
if wait_r > 0 or wait_t > 0 then return {wait_r, wait_t} end
local refill_ms = 0
if req_cap > 0 then
  r = r - req_cost
  refill_ms = math.max(refill_ms, (req_cap - r) * window_ms / req_cap)
end
if tok_cap > 0 then
  t = t - tok_cost
  refill_ms = math.max(refill_ms, (tok_cap - t) * window_ms / tok_cap)
end
redis.call('HSET', KEYS[1], 'r', tostring(r), 't', tostring(t), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(refill_ms) + 1000)
return {0, 0}
"""


class RateLimiter:
    """Per-key request and token limits over a window, shared by every router replica using the same Redis.

    Algorithm: two token buckets per key id (capacity = the per-window limit, refilled continuously at limit per
    window), read, checked and charged in one Lua script on Redis' clock, so concurrent replicas cannot
    overspend and their clocks do not matter. A burst of up to the full limit is allowed; after that, requests
    pass at the steady rate.

    Token charging: the prompt's tokens are charged up front by :meth:`acquire`; completion tokens are charged
    after the fact by :meth:`record_tokens`, unconditionally, which may leave the bucket in debt and delay the
    key's next requests. A request larger than the whole token limit passes only when the bucket is full.

    Invariants: a refused request charges nothing; Redis keys expire once their buckets would be full again;
    any Redis error admits the request (fail open) and is logged once per outage; ``retry_after_s`` >= 1.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        namespace: str,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        *,
        window_s: float = 60.0,
        timeout_s: float = 0.5,
    ) -> None:
        for name, value in (("requests_per_minute", requests_per_minute), ("tokens_per_minute", tokens_per_minute)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive or None, got {value}")
        if window_s <= 0:
            raise ValueError(f"window_s must be positive, got {window_s}")
        self._client = client
        self._namespace = namespace
        self._requests = requests_per_minute or 0
        self._tokens = tokens_per_minute or 0
        self._window_ms = max(1, round(window_s * 1000))
        self._timeout_s = timeout_s
        self._script = client.register_script(_BUCKET_SCRIPT)  # re-loaded by redis-py after NOSCRIPT
        self._outage = OutageLog("rate limiter", logger)

    @property
    def enabled(self) -> bool:
        return bool(self._requests or self._tokens)

    def redis_key(self, key_id: str) -> str:
        """Where the buckets of ``key_id`` live: ``<namespace>:ratelimit:<key_id>``."""
        return f"{self._namespace}:ratelimit:{key_id}"

    async def acquire(self, key_id: str, tokens: int) -> None:
        """Admit one request costing ``tokens`` (the prompt) for ``key_id``, or raise AdmissionError(429)."""
        if not self.enabled:
            return
        waits = await self._run(key_id, request_cost=1, token_cost=max(0, tokens), force=False)
        if waits is None or max(waits) <= 0:
            return
        raise self._refusal(*waits)

    async def record_tokens(self, key_id: str, extra_tokens: int) -> None:
        """Charge tokens counted after the fact (the completion); never refuses, never raises."""
        if self._tokens and extra_tokens > 0:
            await self._run(key_id, request_cost=0, token_cost=extra_tokens, force=True)

    async def _run(self, key_id: str, *, request_cost: int, token_cost: int, force: bool) -> tuple[int, int] | None:
        """The script's (wait_ms_requests, wait_ms_tokens), or None when Redis failed (then: allow)."""
        args = [self._requests, self._tokens, self._window_ms, request_cost, token_cost, int(force)]
        try:
            async with asyncio.timeout(self._timeout_s):
                wait_r, wait_t = await self._script(keys=[self.redis_key(key_id)], args=args)
        except REDIS_ERRORS as error:
            self._outage.down(error)
            return None
        self._outage.up()
        return int(wait_r), int(wait_t)

    def _refusal(self, wait_requests_ms: int, wait_tokens_ms: int) -> AdmissionError:
        limits = []
        if wait_requests_ms > 0:
            limits.append(f"{self._requests} requests")
        if wait_tokens_ms > 0:
            limits.append(f"{self._tokens} tokens")
        window = f"{self._window_ms / 1000:g} s"
        retry_after_s = max(1, math.ceil(max(wait_requests_ms, wait_tokens_ms) / 1000))
        message = f"Rate limit reached: {' and '.join(limits)} per {window}. Retry in {retry_after_s} s."
        return AdmissionError(429, message, code="rate_limit_exceeded", retry_after_s=retry_after_s)


# ------------------------------------------------------------------------------------------------ local queue


class QueueStats(NamedTuple):
    running: int
    waiting: int


class AdmissionQueue:
    """Bounded, FIFO admission for one router: ``max_running`` slots and a waiting line of ``max_waiting``.

    Invariants: ``running <= max_running`` and ``waiting <= max_waiting`` at all times; a freed slot goes
    straight to the oldest waiter (so newcomers cannot overtake the line); a waiter cancelled before it got a
    slot leaves the line and holds nothing, and one cancelled just after it was handed a slot passes that slot on.
    """

    def __init__(self, max_running: int, max_waiting: int) -> None:
        if max_running < 1 or max_waiting < 0:
            raise ValueError(f"need max_running >= 1 and max_waiting >= 0, got {max_running}, {max_waiting}")
        self.max_running = max_running
        self.max_waiting = max_waiting
        self._running = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def stats(self) -> QueueStats:
        return QueueStats(self._running, len(self._waiters))

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one running slot for the body; raise AdmissionError(429, code="queue_full") if the line is full."""
        await self._acquire()
        try:
            yield
        finally:
            self._release()

    async def _acquire(self) -> None:
        if self._running < self.max_running and not self._waiters:
            self._running += 1
            return
        if len(self._waiters) >= self.max_waiting:
            raise AdmissionError(429, "queue full", code="queue_full", retry_after_s=1)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # handed a slot in the same tick as the cancel: pass it on
            elif waiter in self._waiters:  # a release may already have popped (and skipped) it
                self._waiters.remove(waiter)
            raise

    def _release(self) -> None:
        """Give the slot to the oldest live waiter (running unchanged), or free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._running -= 1
