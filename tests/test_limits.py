"""bitrix24.limits against a real Redis: the shared leaky bucket and the per-method operating budget."""

from __future__ import annotations

import multiprocessing
import time

import pytest
import redis

from bitrix24.limits import (
    DEFAULT_OPERATING_MARGIN,
    PLAN_LIMITS,
    LeakyBucket,
    OperatingBudget,
    Pause,
    bucket_limits,
)

# ---------------------------------------------------------------- helpers


def excess_over_bound(grants: list[tuple[float, float]], rate: float, capacity: float) -> float:
    """The worst excess of grants over `capacity + rate * elapsed`, over every window between two grants.

    `grants` holds (time allowed to go, uncertainty of that time). A correct limiter gives <= 0. Each
    window is widened by the two grants' uncertainties, so measurement noise cannot fail the test.
    """
    grants = sorted(grants)
    worst = -float("inf")
    for i in range(len(grants)):
        for j in range(i, len(grants)):
            (a_i, err_i), (a_j, err_j) = grants[i], grants[j]
            allowed = capacity + rate * (a_j - a_i + err_i + err_j)
            worst = max(worst, (j - i + 1) - allowed)
    return worst


def all_keys_expire(conn: redis.Redis) -> None:
    keys = conn.keys("*")
    assert keys, "expected some keys"
    for key in keys:
        assert conn.pttl(key) > 0, f"{key!r} has no expiry"


# ---------------------------------------------------------------- bucket_limits


def test_bucket_limits_plans_overrides_and_headroom() -> None:
    assert PLAN_LIMITS == {"standard": (2.0, 50), "enterprise": (5.0, 250)}
    rate, capacity = bucket_limits("standard", None, None, 0.8)
    assert rate == pytest.approx(2.0) and capacity == pytest.approx(40.0)  # headroom is taken from the burst
    assert bucket_limits("Enterprise", None, None, 0.8) == pytest.approx((5.0, 200.0))
    assert bucket_limits("standard", None, None) == pytest.approx((2.0, 40.0))  # 0.8 is the default
    assert bucket_limits("standard", 3.0, 100, 1.0) == pytest.approx((3.0, 100.0))
    assert bucket_limits("enterprise", 1.0, None, 0.5) == pytest.approx((1.0, 125.0))
    assert bucket_limits("standard", None, 1, 0.5) == pytest.approx((2.0, 1.0))  # never below one request
    with pytest.raises(ValueError):
        bucket_limits("gold", None, None, 0.8)
    with pytest.raises(ValueError):
        bucket_limits("standard", None, None, 1.5)
    with pytest.raises(ValueError):
        bucket_limits("standard", 0.0, None, 0.8)


# ---------------------------------------------------------------- LeakyBucket


def test_burst_of_capacity_goes_at_once_then_one_per_interval(redis_conn: redis.Redis) -> None:
    bucket = LeakyBucket(redis_conn, "p1", rate=2.0, capacity=10)
    waits = [bucket.reserve(max_wait=5) for _ in range(10)]
    assert waits == [0.0] * 10
    eleventh = bucket.reserve(max_wait=5)
    assert 0.4 < eleventh <= 0.5  # 1/rate, less the few ms the burst took
    twelfth = bucket.reserve(max_wait=5)
    assert twelfth == pytest.approx(eleventh + 0.5, abs=0.02)  # queued behind the eleventh
    state = bucket.state()
    assert state["level"] == pytest.approx(12, abs=0.1)
    assert state["slowed"] is False and state["slowed_until"] is None
    # Another portal has its own bucket.
    assert LeakyBucket(redis_conn, "p2", rate=2.0, capacity=10).reserve(max_wait=5) == 0.0


def test_sustained_rate_holds(redis_conn: redis.Redis) -> None:
    rate, capacity = 20.0, 5
    bucket = LeakyBucket(redis_conn, "p1", rate=rate, capacity=capacity)
    grants: list[tuple[float, float]] = []
    sent: list[float] = []
    end = time.time() + 1.0
    while time.time() < end:
        before = time.time()
        wait = bucket.reserve(max_wait=1.0)
        after = time.time()
        assert wait <= 1.0
        grants.append(((before + after) / 2 + wait, (after - before) / 2))
        time.sleep(wait)
        sent.append(time.time())
    assert excess_over_bound(grants, rate, capacity) <= 0
    # And it does let the rate through: the burst, then about `rate` per second.
    after_burst = sent[capacity:]
    measured = (len(after_burst) - 1) / (after_burst[-1] - after_burst[0])
    assert measured == pytest.approx(rate, rel=0.15)
    assert len(sent) >= capacity + rate * 0.9


def test_long_wait_is_returned_without_reserving(redis_conn: redis.Redis) -> None:
    bucket = LeakyBucket(redis_conn, "p1", rate=2.0, capacity=2)
    assert bucket.reserve(max_wait=0.1) == 0.0
    assert bucket.reserve(max_wait=0.1) == 0.0
    refused = bucket.reserve(max_wait=0.1)
    assert 0.4 < refused <= 0.5
    level = bucket.state()["level"]
    again = bucket.reserve(max_wait=0.1)  # not pushed back by the refused call
    assert 0.4 < again <= refused
    assert bucket.state()["level"] <= level
    granted = bucket.reserve(max_wait=1.0)  # now it fits and is reserved
    assert 0.4 < granted <= 0.5
    assert 0.9 < bucket.reserve(max_wait=0.1) <= 1.0  # the next free slot is behind the reserved one
    # max_wait=0 means "only if it can go now".
    assert bucket.reserve(max_wait=0.0) > 0.0


def test_penalize_fills_slows_and_expires(redis_conn: redis.Redis) -> None:
    rate, capacity = 10.0, 5
    bucket = LeakyBucket(redis_conn, "p1", rate=rate, capacity=capacity)
    start = time.time()
    bucket.penalize(seconds=0.5, slowdown=0.5)
    state = bucket.state()
    assert state["slowed"] is True
    assert state["slowed_until"] == pytest.approx(start + 0.5, abs=0.05)
    assert state["rate_in_force"] == pytest.approx(5.0)
    assert state["level"] == pytest.approx(capacity, abs=0.1)  # marked full
    # Full and slowed: one request per 1/(rate*slowdown) = 0.2 s.
    first = bucket.reserve(max_wait=5)
    second = bucket.reserve(max_wait=5)
    assert first == pytest.approx(0.2, abs=0.02)
    assert second - first == pytest.approx(0.2, abs=0.01)
    # Another process sees the same slowdown.
    other = LeakyBucket(redis.Redis(connection_pool=redis_conn.connection_pool), "p1", rate, capacity)
    assert other.state()["slowed"] is True
    # The slowdown expires on its own; once drained, the full burst is back at the normal rate.
    time.sleep(max(0.0, start + 1.0 - time.time()))
    state = bucket.state()
    assert state["slowed"] is False and state["rate_in_force"] == rate
    assert redis_conn.exists(bucket.keys[1]) == 0
    assert [bucket.reserve(max_wait=5) for _ in range(capacity)] == [0.0] * capacity
    assert bucket.reserve(max_wait=5) == pytest.approx(1 / rate, abs=0.01)


def test_penalty_keeps_stronger_slowdown_and_later_end(redis_conn: redis.Redis) -> None:
    bucket = LeakyBucket(redis_conn, "p1", rate=10.0, capacity=5)
    bucket.penalize(seconds=5, slowdown=0.25)
    bucket.penalize(seconds=1, slowdown=0.5)
    state = bucket.state()
    assert state["rate_in_force"] == pytest.approx(2.5)
    assert state["slowed_until"] is not None and state["slowed_until"] - state["now"] > 4.5


def test_bucket_keys_expire(redis_conn: redis.Redis) -> None:
    bucket = LeakyBucket(redis_conn, "p1", rate=2.0, capacity=4)
    for _ in range(6):
        bucket.reserve(max_wait=5)
    bucket.penalize(seconds=3)
    all_keys_expire(redis_conn)
    # The TAT key lives until the bucket would be empty (plus a little), not forever.
    assert redis_conn.pttl(bucket.keys[0]) <= (4 + 2 + 1) / 2 * 1000 + 1000
    assert redis_conn.pttl(bucket.keys[1]) <= 3000


def test_bucket_rejects_bad_arguments(redis_conn: redis.Redis) -> None:
    with pytest.raises(ValueError):
        LeakyBucket(redis_conn, "p1", rate=0, capacity=5)
    with pytest.raises(ValueError):
        LeakyBucket(redis_conn, "p*", rate=1, capacity=5)
    bucket = LeakyBucket(redis_conn, "p1", rate=1, capacity=5)
    for bad in (0, 6):
        with pytest.raises(ValueError):
            bucket.reserve(bad)
    with pytest.raises(ValueError):
        bucket.penalize(1, slowdown=0)


HAMMER_RATE, HAMMER_CAPACITY, HAMMER_SECONDS, HAMMER_MAX_WAIT = 10.0, 8, 1.5, 0.3


Grants = list[tuple[float, float]]  # (unix time a request was allowed to go, uncertainty of that time)


def _hammer(url: str, start_at: float, out: multiprocessing.Queue[tuple[Grants, int]]) -> None:
    """In a child process: from `start_at`, call reserve() in a tight loop; report the grants and calls."""
    conn = redis.Redis.from_url(url)
    bucket = LeakyBucket(conn, "shared", HAMMER_RATE, HAMMER_CAPACITY)
    grants: Grants = []
    calls = 0
    time.sleep(max(0.0, start_at - time.time()))
    while time.time() < start_at + HAMMER_SECONDS:
        before = time.time()
        wait = bucket.reserve(max_wait=HAMMER_MAX_WAIT)
        after = time.time()
        calls += 1
        if wait <= HAMMER_MAX_WAIT:
            grants.append(((before + after) / 2 + wait, (after - before) / 2))
    conn.close()
    out.put((grants, calls))


def test_four_processes_never_exceed_the_bucket(redis_conn: redis.Redis, redis_url: str) -> None:
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue[tuple[Grants, int]] = ctx.Queue()
    start_at = time.time() + 0.3  # all four start together, whatever their fork took
    procs = [ctx.Process(target=_hammer, args=(redis_url, start_at, out)) for _ in range(4)]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=10) for _ in procs]
    for proc in procs:
        proc.join(5)
        assert proc.exitcode == 0
    grants = [g for process_grants, _ in results for g in process_grants]
    calls = sum(n for _, n in results)
    assert all(process_grants for process_grants, _ in results), "every process got slots"
    assert calls > 4 * len(grants), "the processes really competed (most calls refused)"
    assert excess_over_bound(grants, HAMMER_RATE, HAMMER_CAPACITY) <= 0
    # It is a limiter, not a wall: about capacity + rate * (run time + max_wait) slots were handed out.
    assert len(grants) >= HAMMER_CAPACITY + HAMMER_RATE * (HAMMER_SECONDS + HAMMER_MAX_WAIT) - 3


# ---------------------------------------------------------------- OperatingBudget


def test_record_below_threshold_stores_and_overwrites(redis_conn: redis.Redis) -> None:
    budget = OperatingBudget(redis_conn, "p1", limit=420, window=600, margin=10)
    reset_at = time.time() + 300
    assert budget.record("catalog.document.cancel", 100.0, reset_at) is None
    assert budget.record("catalog.document.cancel", 50.0, reset_at) is None
    usage = budget.usage("catalog.document.cancel")
    assert usage is not None
    assert usage.operating == 50.0  # overwritten by the server's running total, not added up
    assert usage.reset_at == pytest.approx(reset_at, abs=1e-5)
    assert budget.paused_until("catalog.document.cancel") is None
    assert budget.pauses() == {}
    assert budget.record("catalog.document.cancel", None, None) is None  # nothing to record
    assert budget.usage("catalog.document.cancel") == usage
    assert budget.usage("catalog.document.list") is None


def test_record_at_threshold_pauses_one_method_of_one_portal(redis_conn: redis.Redis) -> None:
    budget = OperatingBudget(redis_conn, "p1", limit=420, window=600, margin=10, resume_slack=1.0)
    reset_at = time.time() + 120
    assert budget.record("catalog.document.cancel", 409.9, reset_at) is None
    pause = budget.record("catalog.document.cancel", 410.0, reset_at)
    assert pause is not None and pause.method == "catalog.document.cancel" and pause.new is True
    assert pause.until == pytest.approx(reset_at + 1.0, abs=1e-5)
    assert budget.paused_until("catalog.document.cancel") == pytest.approx(reset_at + 1.0, abs=1e-5)
    assert budget.paused_until("CATALOG.DOCUMENT.CANCEL") == pytest.approx(reset_at + 1.0, abs=1e-5)
    # Other methods and other portals are not affected.
    assert budget.paused_until("catalog.document.list") is None
    other_portal = OperatingBudget(redis_conn, "p2")
    assert other_portal.paused_until("catalog.document.cancel") is None
    assert other_portal.pauses() == {}
    assert budget.pauses() == {"catalog.document.cancel": pytest.approx(reset_at + 1.0, abs=1e-5)}
    # The pause is NEW only once, whoever reports it next.
    again = budget.record("catalog.document.cancel", 415.0, reset_at)
    assert again is not None and again.new is False
    assert budget.pause("catalog.document.cancel", reset_at).new is False
    # A second method gets its own, new pause.
    list_pause = budget.pause("catalog.document.list", reset_at + 30)
    assert list_pause.new is True
    assert set(budget.pauses()) == {"catalog.document.cancel", "catalog.document.list"}
    all_keys_expire(redis_conn)


def test_default_margin_and_fallback_pause_length(redis_conn: redis.Redis) -> None:
    budget = OperatingBudget(redis_conn, "p1", resume_slack=0.0)
    assert budget.threshold == 420.0 - DEFAULT_OPERATING_MARGIN
    assert budget.record("m.a", budget.threshold - 0.01, None) is None
    now = time.time()
    pause = budget.record("m.a", budget.threshold, None)  # no reset time: one bucket, window/10
    assert pause is not None and pause.new
    assert pause.until == pytest.approx(now + 60, abs=1)
    # A reset time already past is no reason to resume at once.
    past = budget.record("m.b", 430.0, now - 5)
    assert past is not None and past.until == pytest.approx(now + 60, abs=1)
    # An absurd reset time is capped at one window.
    far = budget.pause("m.c", now + 10 * 3600)
    assert far.until == pytest.approx(now + 600, abs=1)


def test_pause_without_until_uses_last_recorded_reset(redis_conn: redis.Redis) -> None:
    budget = OperatingBudget(redis_conn, "p1", resume_slack=0.0)
    reset_at = time.time() + 200
    budget.record("catalog.document.cancel", 30.0, reset_at)
    assert budget.pause("catalog.document.cancel").until == pytest.approx(reset_at, abs=1e-5)
    now = time.time()
    assert budget.pause("never.recorded").until == pytest.approx(now + 60, abs=1)


def test_pause_never_shortens(redis_conn: redis.Redis) -> None:
    budget = OperatingBudget(redis_conn, "p1", resume_slack=0.0)
    now = time.time()
    first = budget.pause("m", now + 100)
    shorter = budget.pause("m", now + 10)
    assert shorter == Pause("m", first.until, False)
    longer = budget.pause("m", now + 200)
    assert longer.until == pytest.approx(now + 200, abs=1e-5) and longer.new is False
    assert budget.paused_until("m") == pytest.approx(now + 200, abs=1e-5)


def test_pause_ends_on_its_own_and_a_later_one_is_new_again(redis_conn: redis.Redis) -> None:
    budget = OperatingBudget(redis_conn, "p1", resume_slack=0.0)
    keep = budget.pause("keep", time.time() + 60)
    short = budget.pause("short", time.time() + 0.3)
    assert short.new and keep.new
    assert set(budget.pauses()) == {"keep", "short"}
    time.sleep(0.4)
    assert budget.paused_until("short") is None
    assert budget.pauses() == {"keep": pytest.approx(keep.until)}
    assert budget.pause("short", time.time() + 0.3).new is True
    assert budget.pause("keep", time.time() + 0.3).new is False


def test_pause_new_flag_is_true_for_exactly_one_of_many_processes(redis_conn: redis.Redis,
                                                                 redis_url: str) -> None:
    with multiprocessing.get_context("fork").Pool(4) as pool:
        flags = pool.map(_pause_once, [redis_url] * 8)
    assert sorted(flags) == [False] * 7 + [True]


def _pause_once(url: str) -> bool:
    conn = redis.Redis.from_url(url)
    try:
        return OperatingBudget(conn, "p1").pause("catalog.document.cancel", time.time() + 30).new
    finally:
        conn.close()
