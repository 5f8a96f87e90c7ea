"""Router admission: API keys, rate limits against a real Redis (shared by two "replicas"), the bounded queue."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from common.config import CoordConfig
from common.coord import RedisServer, connect
from common.coord.redis_server import free_port
from services.router.admission import (
    ANONYMOUS,
    AdmissionError,
    AdmissionQueue,
    ApiKeys,
    RateLimiter,
    key_id,
)

pytestmark = pytest.mark.timeout(20)

_NAMESPACES = itertools.count()


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def namespace() -> str:
    return f"adm{next(_NAMESPACES)}"


def _config(url: str) -> CoordConfig:
    return CoordConfig(redis_url=url, ttl_s=5.0)  # connect(): socket timeouts of 5 s


@pytest_asyncio.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    redis_client = connect(_config(redis_server.url))
    yield redis_client
    await redis_client.aclose()


@pytest_asyncio.fixture
async def other_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A second connection: what another router replica would hold."""
    redis_client = connect(_config(redis_server.url))
    yield redis_client
    await redis_client.aclose()


def _limiter(client: aioredis.Redis, namespace: str, requests_per_minute: int | None, tokens_per_minute: int | None,
             **options: float) -> RateLimiter:
    """A limiter whose Redis timeout is generous, so a loaded test machine does not make it fail open."""
    options.setdefault("timeout_s", 5.0)
    return RateLimiter(client, namespace, requests_per_minute, tokens_per_minute, **options)


async def _refusal(limiter: RateLimiter, key: str, tokens: int = 0) -> AdmissionError:
    with pytest.raises(AdmissionError) as info:
        await limiter.acquire(key, tokens)
    assert info.value.status == 429 and info.value.code == "rate_limit_exceeded"
    return info.value


# ------------------------------------------------------------------------------------------------------ errors


def test_admission_error_fields_and_shape() -> None:
    refused = AdmissionError(429, "slow down", code="rate_limit_exceeded", retry_after_s=0)
    assert (refused.status, refused.code, refused.retry_after_s, refused.param) == (429, "rate_limit_exceeded", 1, None)
    assert refused.headers() == {"Retry-After": "1"}
    assert refused.body() == {"error": {"message": "slow down", "type": "rate_limit_error", "param": None,
                                        "code": "rate_limit_exceeded"}}
    unauthorized = AdmissionError(401, "no", code="invalid_api_key", retry_after_s=5)
    assert unauthorized.retry_after_s is None and str(unauthorized) == "no"


# ---------------------------------------------------------------------------------------------------- API keys


def test_no_keys_configured_lets_everything_pass() -> None:
    keys = ApiKeys.load(environ={})
    assert not keys.enabled
    for header in (None, "", "garbage", "Bearer whatever"):
        assert keys.check(header) == ANONYMOUS


@pytest.mark.parametrize("header", [None, "", "   ", "sk-one", "Basic sk-one", "Bearer", "Bearer sk-one extra",
                                    "Bearer sk-wrong", "Bearer sk-on", "Bearer sk-one1"])
def test_missing_malformed_or_wrong_key_is_401(header: str | None) -> None:
    keys = ApiKeys(["sk-one", "sk-two"])
    with pytest.raises(AdmissionError) as info:
        keys.check(header)
    assert info.value.status == 401 and info.value.code == "invalid_api_key"
    assert info.value.retry_after_s is None
    assert "sk-one" not in info.value.message and "sk-two" not in info.value.message


def test_right_key_gives_its_stable_id_never_the_key() -> None:
    keys = ApiKeys(["sk-one", "sk-two"])
    first, second = keys.check("Bearer sk-one"), keys.check("bearer   sk-two")
    assert first == key_id("sk-one") == ApiKeys(["sk-one"]).check("Bearer sk-one")
    assert second == key_id("sk-two") != first
    assert len(first) == 16 and "sk-one" not in first


def test_keys_from_environment_variable() -> None:
    keys = ApiKeys.load(environ={"TANDEM_API_KEYS": " sk-a, sk-b ,,"})
    assert len(keys) == 2
    assert keys.check("Bearer sk-b") == key_id("sk-b")
    with pytest.raises(AdmissionError):
        keys.check("Bearer sk-c")


def test_keys_from_file_and_union_with_other_sources(tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    path.write_text("# team keys\nsk-file-1\n\nsk-file-2, sk-file-3\n")
    keys = ApiKeys.load(["sk-arg"], environ={"TANDEM_API_KEYS_FILE": str(path), "TANDEM_API_KEYS": "sk-env"})
    assert len(keys) == 5
    for key in ("sk-arg", "sk-env", "sk-file-1", "sk-file-2", "sk-file-3"):
        assert keys.check(f"Bearer {key}") == key_id(key)
    with pytest.raises(AdmissionError):
        keys.check("Bearer # team keys")


def test_a_named_keys_file_that_is_missing_or_empty_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        ApiKeys.load(environ={"TANDEM_API_KEYS_FILE": str(tmp_path / "absent")})
    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n\n")
    with pytest.raises(ValueError, match="no key"):
        ApiKeys.load(keys_file=empty, environ={})


# ------------------------------------------------------------------------------------------------- rate limits


@pytest.mark.asyncio
async def test_n_requests_pass_and_the_next_is_429(client: aioredis.Redis, namespace: str) -> None:
    limiter = _limiter(client, namespace, requests_per_minute=5, tokens_per_minute=None)
    for _ in range(5):
        await limiter.acquire("k1", 10)
    refused = await _refusal(limiter, "k1")
    assert refused.retry_after_s is not None and 1 <= refused.retry_after_s <= 12  # one request refills in 12 s
    assert "5 requests" in refused.message
    await limiter.acquire("k2", 10)  # other keys have their own limit


@pytest.mark.asyncio
async def test_two_replicas_share_one_limit(client: aioredis.Redis, other_client: aioredis.Redis,
                                            namespace: str) -> None:
    replica_a = _limiter(client, namespace, requests_per_minute=4, tokens_per_minute=None)
    replica_b = _limiter(other_client, namespace, requests_per_minute=4, tokens_per_minute=None)
    for limiter in (replica_a, replica_b, replica_a, replica_b):
        await limiter.acquire("k", 1)
    await _refusal(replica_a, "k")
    await _refusal(replica_b, "k")


@pytest.mark.asyncio
async def test_concurrent_acquires_on_two_replicas_never_overspend(client: aioredis.Redis,
                                                                   other_client: aioredis.Redis,
                                                                   namespace: str) -> None:
    replicas = [_limiter(c, namespace, requests_per_minute=10, tokens_per_minute=None)
                for c in (client, other_client)]
    results = await asyncio.gather(*(replicas[i % 2].acquire("k", 1) for i in range(60)), return_exceptions=True)
    assert sum(result is None for result in results) == 10
    assert all(isinstance(result, AdmissionError) for result in results if result is not None)


@pytest.mark.asyncio
async def test_tokens_limit_counts_prompt_up_front_and_completion_after(client: aioredis.Redis,
                                                                        namespace: str) -> None:
    limiter = _limiter(client, namespace, requests_per_minute=None, tokens_per_minute=100)
    await limiter.acquire("k", 60)
    refused = await _refusal(limiter, "k", 50)  # 40 left
    assert "100 tokens" in refused.message
    await limiter.acquire("k", 40)
    await limiter.record_tokens("k", 30)  # completion tokens: a debt of 30
    refused = await _refusal(limiter, "k", 1)
    assert refused.retry_after_s in (18, 19)  # 31 tokens at 100 per 60 s: 18.6 s (less what refilled meanwhile)


@pytest.mark.asyncio
async def test_request_larger_than_the_token_limit_passes_only_on_a_full_bucket(client: aioredis.Redis,
                                                                               namespace: str) -> None:
    limiter = _limiter(client, namespace, requests_per_minute=None, tokens_per_minute=100)
    await limiter.acquire("k", 500)  # full: admitted, leaves a debt of 400
    refused = await _refusal(limiter, "k", 1)
    assert refused.retry_after_s is not None and 235 <= refused.retry_after_s <= 241  # 401 tokens at 100 per 60 s


@pytest.mark.asyncio
async def test_both_limits_and_a_refusal_charges_nothing(client: aioredis.Redis, namespace: str) -> None:
    limiter = _limiter(client, namespace, requests_per_minute=3, tokens_per_minute=100)
    await limiter.acquire("k", 90)
    for _ in range(5):
        await _refusal(limiter, "k", 20)  # tokens refuse; the request count is not charged
    await limiter.acquire("k", 5)
    await limiter.acquire("k", 5)
    refused = await _refusal(limiter, "k", 0)  # now the request limit
    assert "3 requests" in refused.message


@pytest.mark.asyncio
async def test_window_recovers_after_time_passes(client: aioredis.Redis, namespace: str) -> None:
    limiter = _limiter(client, namespace, requests_per_minute=3, tokens_per_minute=None, window_s=1.0)
    for _ in range(3):
        await limiter.acquire("k", 0)
    assert (await _refusal(limiter, "k")).retry_after_s == 1
    await asyncio.sleep(0.4)  # a third of the window: one request back
    await limiter.acquire("k", 0)
    await asyncio.sleep(1.05)  # a whole window: the full burst back
    for _ in range(3):
        await limiter.acquire("k", 0)
    await _refusal(limiter, "k")


@pytest.mark.asyncio
async def test_redis_keys_expire_once_the_buckets_are_full_again(client: aioredis.Redis, namespace: str) -> None:
    limiter = _limiter(client, namespace, requests_per_minute=2, tokens_per_minute=None, window_s=1.0)
    await limiter.acquire("k", 0)
    ttl_ms = await client.pttl(limiter.redis_key("k"))
    assert 0 < ttl_ms <= 1500 + 1000  # half a window to refill one request, plus a second of slack
    assert await client.exists(limiter.redis_key("never-used")) == 0


@pytest.mark.asyncio
async def test_no_limits_never_touches_redis() -> None:
    client = connect(_config(f"redis://127.0.0.1:{free_port()}/0"))
    limiter = RateLimiter(client, "ns", None, None)
    assert not limiter.enabled
    for _ in range(100):
        await limiter.acquire("k", 10**6)
    await limiter.record_tokens("k", 10**6)
    await client.aclose()


@pytest.mark.asyncio
async def test_redis_down_allows_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    client = connect(_config(f"redis://127.0.0.1:{free_port()}/0"))  # nothing listens there
    limiter = RateLimiter(client, "ns", requests_per_minute=1, tokens_per_minute=1)
    try:
        with caplog.at_level(logging.WARNING, logger="services.router.admission"):
            for _ in range(5):
                await limiter.acquire("k", 100)
                await limiter.record_tokens("k", 100)
        warnings = [r for r in caplog.records if "Redis unavailable" in r.getMessage()]
        assert len(warnings) == 1
    finally:
        await client.aclose()


@pytest.mark.asyncio
async def test_limiter_survives_a_redis_restart(namespace: str) -> None:
    """Down: allowed. Back, empty (no script cached): limits apply again."""
    with RedisServer() as server:
        client = connect(_config(server.url))
        limiter = _limiter(client, namespace, requests_per_minute=2, tokens_per_minute=None)
        try:
            await limiter.acquire("k", 0)
            await limiter.acquire("k", 0)
            await _refusal(limiter, "k")
            server.kill()
            for _ in range(3):
                await limiter.acquire("k", 0)
            server.start()
            await limiter.acquire("k", 0)
            await limiter.acquire("k", 0)
            await _refusal(limiter, "k")
        finally:
            await client.aclose()


@pytest.mark.asyncio
async def test_a_slow_redis_fails_open_within_the_timeout(redis_server: RedisServer, namespace: str) -> None:
    client = connect(_config(redis_server.url))
    blocker = connect(_config(redis_server.url))
    limiter = _limiter(client, namespace, requests_per_minute=1, tokens_per_minute=None, timeout_s=0.2)
    try:
        await limiter.acquire("k", 0)
        await blocker.execute_command("CLIENT", "PAUSE", "600", "ALL")  # Redis holds every command for 0.6 s
        loop = asyncio.get_running_loop()
        started = loop.time()
        await limiter.acquire("k", 0)  # would be refused, but Redis does not answer in time
        assert loop.time() - started < 0.5
        await asyncio.sleep(0.6)
        await _refusal(limiter, "k")  # and once it answers, the limit holds again
    finally:
        await client.aclose()
        await blocker.aclose()


# ------------------------------------------------------------------------------------------------------- queue


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.mark.asyncio
async def test_queue_is_fifo() -> None:
    queue = AdmissionQueue(max_running=1, max_waiting=10)
    order: list[int] = []
    gate = asyncio.Event()

    async def worker(index: int) -> None:
        async with queue.slot():
            order.append(index)
            if index == 0:
                await gate.wait()

    tasks = []
    for index in range(6):
        tasks.append(asyncio.create_task(worker(index)))
        await _settle()  # each reaches the line before the next starts
    assert queue.stats() == (1, 5)
    gate.set()
    await asyncio.gather(*tasks)
    assert order == list(range(6))
    assert queue.stats() == (0, 0)


@pytest.mark.asyncio
async def test_newcomer_does_not_overtake_the_line() -> None:
    queue = AdmissionQueue(max_running=1, max_waiting=10)
    order: list[str] = []

    async def worker(name: str) -> None:
        async with queue.slot():
            order.append(name)

    async with queue.slot():
        waiter = asyncio.create_task(worker("waiter"))
        await _settle()
    newcomer = asyncio.create_task(worker("newcomer"))  # the slot was handed to the waiter already
    await asyncio.gather(waiter, newcomer)
    assert order == ["waiter", "newcomer"]


@pytest.mark.asyncio
async def test_full_line_is_refused_immediately() -> None:
    queue = AdmissionQueue(max_running=1, max_waiting=2)
    gate = asyncio.Event()

    async def hold() -> None:
        async with queue.slot():
            await gate.wait()

    tasks = [asyncio.create_task(hold()) for _ in range(3)]
    await _settle()
    assert queue.stats() == (1, 2)
    with pytest.raises(AdmissionError) as info:
        async with asyncio.timeout(0.1), queue.slot():
            pytest.fail("must not be admitted")
    assert (info.value.status, info.value.code, info.value.retry_after_s) == (429, "queue_full", 1)
    assert queue.stats() == (1, 2)
    gate.set()
    await asyncio.gather(*tasks)
    assert queue.stats() == (0, 0)


@pytest.mark.asyncio
async def test_no_waiting_allowed_refuses_when_busy() -> None:
    queue = AdmissionQueue(max_running=1, max_waiting=0)
    async with queue.slot():
        with pytest.raises(AdmissionError):
            async with queue.slot():
                pass
    async with queue.slot():
        assert queue.stats() == (1, 0)


@pytest.mark.asyncio
async def test_cancelled_waiter_leaves_no_trace_and_the_next_proceeds() -> None:
    queue = AdmissionQueue(max_running=1, max_waiting=5)
    admitted: list[str] = []

    async def worker(name: str) -> None:
        async with queue.slot():
            admitted.append(name)

    async with queue.slot():
        first = asyncio.create_task(worker("first"))
        second = asyncio.create_task(worker("second"))
        await _settle()
        assert queue.stats() == (1, 2)
        first.cancel()  # the client went away while waiting
        await asyncio.gather(first, return_exceptions=True)
        assert queue.stats() == (1, 1)
    await asyncio.wait_for(second, 1.0)
    assert admitted == ["second"] and first.cancelled()
    assert queue.stats() == (0, 0)


@pytest.mark.asyncio
async def test_waiter_cancelled_in_the_tick_it_gets_a_slot_passes_it_on() -> None:
    queue = AdmissionQueue(max_running=1, max_waiting=5)
    admitted: list[str] = []

    async def worker(name: str) -> None:
        async with queue.slot():
            admitted.append(name)

    holder = queue.slot()
    await holder.__aenter__()
    first = asyncio.create_task(worker("first"))
    second = asyncio.create_task(worker("second"))
    await _settle()
    await holder.__aexit__(None, None, None)  # hands the slot to first...
    first.cancel()  # ...which is cancelled before it runs
    await asyncio.gather(first, return_exceptions=True)
    await asyncio.wait_for(second, 1.0)
    assert admitted == ["second"]
    assert queue.stats() == (0, 0)


@pytest.mark.asyncio
async def test_an_error_inside_the_slot_releases_it() -> None:
    queue = AdmissionQueue(max_running=1, max_waiting=1)
    with pytest.raises(RuntimeError):
        async with queue.slot():
            raise RuntimeError("boom")
    assert queue.stats() == (0, 0)


@pytest.mark.asyncio
async def test_slots_never_exceed_max_running_under_200_tasks_with_cancellations() -> None:
    queue = AdmissionQueue(max_running=4, max_waiting=200)
    rng = random.Random(7)
    running = peak = completed = 0

    async def worker() -> None:
        nonlocal running, peak, completed
        async with queue.slot():
            running += 1
            try:
                peak = max(peak, running)
                assert queue.stats().running <= 4
                await asyncio.sleep(rng.random() * 0.005)
            finally:  # cancelled in the body too
                running -= 1
        completed += 1

    tasks = [asyncio.create_task(worker()) for _ in range(200)]
    await asyncio.sleep(0)
    for task in rng.sample(tasks, 50):
        task.cancel()
        await asyncio.sleep(rng.random() * 0.002)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    cancelled = sum(isinstance(result, asyncio.CancelledError) for result in results)
    assert not [r for r in results if r is not None and not isinstance(r, asyncio.CancelledError)]
    assert peak == 4 and running == 0
    assert completed + cancelled == 200 and cancelled > 0
    assert queue.stats() == (0, 0)
