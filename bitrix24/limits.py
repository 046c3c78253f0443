"""Bitrix24 REST limits shared by every worker process through Redis.

Two limits, two classes:

* `LeakyBucket`: the portal's request-rate limit (per portal and source IP, a leaky bucket that drains
  2/s and refuses past 50; Enterprise 5/s and 250). One Redis key per portal holds the GCRA
  "theoretical arrival time"; one Lua script reserves slots atomically against Redis server time,
  so processes on different machines queue up behind each other on one clock.
* `OperatingBudget`: the per-method operating-time limit (about 420-480 s of `time.operating` per
  10-minute sliding window). It stores the server's running total from each answer and pauses a
  method near the limit, or at once on a 429 OPERATION_TIME_LIMIT, until the window frees up.

Imports only the standard library and `redis`; knows nothing of Flask or RQ. Every key expires on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypedDict

import redis

# The documented plans as (drain rate per second, bucket size); every plan but Enterprise is "standard".
PLAN_LIMITS: dict[str, tuple[float, int]] = {"standard": (2.0, 50), "enterprise": (5.0, 250)}
# Share of the portal's rate and burst we allow ourselves: other apps and webhooks on our IP share the bucket.
DEFAULT_HEADROOM = 0.8
# How long reserve() lets a caller sleep for its slot; past that, re-enqueue the job, not hold a worker.
DEFAULT_MAX_WAIT = 5.0
# Rate multiplier after a QUERY_LIMIT_EXCEEDED: someone else is using the bucket, so we take half our share.
DEFAULT_SLOWDOWN = 0.5
# Waits shorter than this are returned as 0.0: float rounding of stored times, below what sleep() honours.
MIN_WAIT = 0.001
# Kept on a bucket key past the moment it would be empty, so a key never expires while it still matters.
KEY_TTL_SLACK_MS = 1000

# Operating seconds allowed per method and window: the Bitrix24 core default (the cloud has used 480).
DEFAULT_OPERATING_LIMIT = 420.0
# The sliding window the server sums `time.operating` over, in seconds.
DEFAULT_OPERATING_WINDOW = 600.0
# The window is made of this many buckets; without a reset time, the oldest frees up within window / buckets.
OPERATING_BUCKETS = 10
# Pause this far below the limit: covers calls still in flight from several workers (a cancel takes ~0.3 s).
DEFAULT_OPERATING_MARGIN = 10.0
# Resume this long after the server's reset time: clocks differ, and resuming early earns another 429.
DEFAULT_RESUME_SLACK = 1.0


def bucket_limits(plan: str, rate: float | None, burst: int | None,
                  headroom: float = DEFAULT_HEADROOM) -> tuple[float, float]:
    """The (rate per second, capacity) we allow ourselves on a portal.

    `rate` and `burst` override the plan's figures; they describe the *portal's* limit. The headroom
    scales the burst only: we keep (1 - headroom) of the portal's bucket free for other integrations on the
    same IP and for timing jitter between our clock and the portal's, and drain at the portal's own rate, so a
    long queue of work finishes as fast as the portal allows. If another app does use the rate, the portal
    answers QUERY_LIMIT_EXCEEDED and `penalize()` halves our rate for a while.
    Standard: (2.0, 40.0). Enterprise: (5.0, 250 * 0.8 = 200.0). The capacity is never below one request.
    """
    try:
        plan_rate, plan_burst = PLAN_LIMITS[plan.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown Bitrix24 plan {plan!r}; expected one of {sorted(PLAN_LIMITS)}") from None
    if not 0.0 < headroom <= 1.0:
        raise ValueError(f"headroom must be in (0, 1], got {headroom}")
    portal_rate = plan_rate if rate is None else float(rate)
    portal_burst = plan_burst if burst is None else burst
    if portal_rate <= 0 or portal_burst < 1:
        raise ValueError(f"rate must be > 0 and burst >= 1, got rate={portal_rate} burst={portal_burst}")
    return portal_rate, max(1.0, portal_burst * headroom)


# Shared Lua prologue: the Redis server's clock, so every machine agrees on "now".
_LUA_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function fmt(x) return string.format('%.6f', x) end
"""

# KEYS: tat, slow. ARGV: interval (1/rate), tau (capacity/rate), cost, max_wait, min_wait, ttl slack ms.
# Returns {granted '1'/'0', wait}. Numbers travel as strings: Lua numbers returned to Redis become integers.
_RESERVE_LUA = _LUA_NOW + """
local interval, tau = tonumber(ARGV[1]), tonumber(ARGV[2])
local cost, max_wait, min_wait = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local slowdown = tonumber(redis.call('GET', KEYS[2]) or '1')
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + cost * interval / slowdown
local wait = new_tat - tau - now
if wait < min_wait then wait = 0 end
if wait > max_wait then return {'0', fmt(wait)} end
redis.call('SET', KEYS[1], fmt(new_tat), 'PX', math.ceil((new_tat - now) * 1000) + tonumber(ARGV[6]))
return {'1', fmt(wait)}
"""

# KEYS: tat, slow. ARGV: tau, seconds, slowdown, ttl slack ms. Fills the bucket and slows it down.
_PENALIZE_LUA = _LUA_NOW + """
local tau, seconds, slowdown = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now + tau then tat = now + tau end
redis.call('SET', KEYS[1], fmt(tat), 'PX', math.ceil((tat - now) * 1000) + tonumber(ARGV[4]))
local ttl = math.ceil(seconds * 1000)
if ttl > 0 and slowdown < 1 then
  local current = tonumber(redis.call('GET', KEYS[2]) or '1')
  local current_ttl = redis.call('PTTL', KEYS[2])
  if current < slowdown then slowdown = current end
  if current_ttl > ttl then ttl = current_ttl end
  redis.call('SET', KEYS[2], fmt(slowdown), 'PX', ttl)
end
return 1
"""

# KEYS: tat, slow. Returns {now, tat or '', slowdown or '', slow pttl}.
_BUCKET_STATE_LUA = _LUA_NOW + """
return {fmt(now), redis.call('GET', KEYS[1]) or '', redis.call('GET', KEYS[2]) or '',
        tostring(redis.call('PTTL', KEYS[2]))}
"""


def _text(value: bytes | str | int) -> str:
    """A Redis reply as text, whether or not the connection decodes responses."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _check_name(what: str, value: str) -> str:
    if not value or any(c in value for c in "{}*?[] \n"):
        raise ValueError(f"{what} must be non-empty, without braces, glob characters or spaces: {value!r}")
    return value


class BucketState(TypedDict):
    """What `LeakyBucket.state()` reports; times are Redis server unix time."""

    portal: str
    now: float
    rate: float  # our configured rate (requests per second)
    capacity: float  # our configured capacity (requests)
    level: float  # requests in the bucket now, queued reservations included (can exceed capacity)
    rate_in_force: float  # rate * slowdown while slowed, else rate
    capacity_in_force: float  # burst allowed from empty: capacity * slowdown while slowed, else capacity
    wait: float  # seconds a request of cost 1 would wait if reserved now
    slowed: bool
    slowed_until: float | None


class LeakyBucket:
    """One portal's request-rate limit, shared through Redis by every process (GCRA, virtual scheduling).

    The key `<prefix>:{<portal>}:tat` holds the theoretical arrival time (TAT): the moment the bucket
    would be empty again. A request of cost n moves it to max(TAT, now) + n/rate and may be sent once
    TAT - now <= capacity/rate, i.e. once the bucket holds no more than `capacity` requests. A burst of
    `capacity` goes at once, then one request every 1/rate seconds. Reserving moves the TAT at once,
    so concurrent callers get successive slots instead of all waking together.

    While slowed (after `penalize`), each request weighs 1/slowdown: the sustained rate becomes
    rate*slowdown and the burst from empty capacity*slowdown. When the slowdown ends, the TAT is still
    valid, so the rate returns to normal without a jump.

    Keys carry a `{portal}` hash tag, so the script's two keys share a Redis Cluster slot.
    """

    def __init__(self, redis: redis.Redis, portal: str, rate: float, capacity: float,
                 key_prefix: str = "b24c:limit") -> None:
        if rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.redis = redis
        self.portal = _check_name("portal", portal)
        self.rate = float(rate)
        self.capacity = float(capacity)
        self.interval = 1.0 / self.rate  # seconds one request adds to the TAT
        self.tau = self.capacity * self.interval  # seconds of backlog a full bucket holds
        base = f"{key_prefix}:{{{portal}}}"
        self.keys = [f"{base}:tat", f"{base}:slow"]
        self._reserve = redis.register_script(_RESERVE_LUA)
        self._penalize = redis.register_script(_PENALIZE_LUA)
        self._state = redis.register_script(_BUCKET_STATE_LUA)

    def reserve(self, cost: int = 1, max_wait: float = DEFAULT_MAX_WAIT) -> float:
        """Reserve a slot for a request of `cost` (a batch is 1) and return how long to sleep before sending.

        * 0.0: send now (the slot is taken).
        * 0 < wait <= max_wait: the slot is taken; sleep `wait` seconds, then send.
        * wait > max_wait: nothing was reserved; the request could go in about `wait` seconds.
          Re-enqueue the job for then rather than hold a worker (and reserve again when it runs).
        """
        if isinstance(cost, bool) or not isinstance(cost, int) or cost < 1:
            raise ValueError(f"cost must be a positive int, got {cost!r}")
        if cost > self.capacity:
            raise ValueError(f"cost {cost} exceeds the bucket capacity {self.capacity}")
        if max_wait < 0:
            raise ValueError(f"max_wait must be >= 0, got {max_wait}")
        args = [repr(self.interval), repr(self.tau), str(cost), repr(float(max_wait)), repr(MIN_WAIT),
                str(KEY_TTL_SLACK_MS)]
        granted, wait = self._reserve(keys=self.keys, args=args)
        seconds = float(_text(wait))
        if _text(granted) == "1":
            return min(seconds, max_wait)
        # The caller tells "refused" by wait > max_wait; keep that true whatever the rounding.
        return max(seconds, math.nextafter(max_wait, math.inf))

    def penalize(self, seconds: float, slowdown: float = DEFAULT_SLOWDOWN) -> None:
        """The portal answered QUERY_LIMIT_EXCEEDED anyway: treat the bucket as full and slow down.

        The bucket is marked full now (queued reservations keep their places; the next new slot is
        one slowed interval after the last). For `seconds` every process uses rate*slowdown; a second
        penalty keeps the stronger slowdown and the later end.
        """
        if seconds < 0:
            raise ValueError(f"seconds must be >= 0, got {seconds}")
        if not 0.0 < slowdown <= 1.0:
            raise ValueError(f"slowdown must be in (0, 1], got {slowdown}")
        self._penalize(keys=self.keys, args=[repr(self.tau), repr(float(seconds)), repr(float(slowdown)),
                                             KEY_TTL_SLACK_MS])

    def state(self) -> BucketState:
        """The bucket as Redis sees it now, for status pages and logs."""
        now_s, tat_s, slow_s, pttl_s = (_text(v) for v in self._state(keys=self.keys))
        now = float(now_s)
        tat = max(float(tat_s), now) if tat_s else now
        slowdown = float(slow_s) if slow_s else 1.0
        pttl = int(pttl_s)
        slowed = bool(slow_s) and slowdown < 1.0
        wait = max(0.0, tat + self.interval / slowdown - self.tau - now)
        return BucketState(
            portal=self.portal,
            now=now,
            rate=self.rate,
            capacity=self.capacity,
            level=(tat - now) * self.rate,
            rate_in_force=self.rate * slowdown,
            capacity_in_force=self.capacity * slowdown,
            wait=wait if wait >= MIN_WAIT else 0.0,
            slowed=slowed,
            slowed_until=now + pttl / 1000 if slowed and pttl > 0 else None,
        )


@dataclass(frozen=True)
class Pause:
    """A method paused until `until` (Redis server unix time).

    `new` is True only for the call that started the pause (no pause was in force for that method of
    that portal); extending or repeating a pause gives False. Log the pause when `new` is True and
    every process together writes one line per pause.
    """

    method: str
    until: float
    new: bool


@dataclass(frozen=True)
class Usage:
    """The latest operating figures recorded for a method (`recorded_at` in Redis server unix time)."""

    operating: float
    reset_at: float | None
    recorded_at: float


# Shared by the record and pause scripts. KEYS: pause key, index hash, usage hash.
# pause(method, until, bucket, slack, max_ahead) -> {until, new}: `until` empty or past means "the last
# recorded reset time if still ahead, else one bucket from now". Never shortens a pause in force.
_PAUSE_LUA = _LUA_NOW + """
local function pause(method, until_, bucket, slack, max_ahead)
  if until_ == nil then until_ = tonumber(redis.call('HGET', KEYS[3], 'reset_at') or '') end
  if until_ == nil or until_ <= now then until_ = now + bucket end
  until_ = math.min(until_, now + max_ahead) + slack
  local current = tonumber(redis.call('GET', KEYS[1]) or '0')
  if current >= until_ then return {fmt(current), '0'} end
  local new = '1'
  if current > now then new = '0' end
  redis.call('SET', KEYS[1], fmt(until_), 'PX', math.ceil((until_ - now) * 1000))
  redis.call('HSET', KEYS[2], method, fmt(until_))
  local latest = until_
  local all = redis.call('HGETALL', KEYS[2])
  for i = 1, #all, 2 do
    local u = tonumber(all[i + 1])
    if u == nil or u <= now then redis.call('HDEL', KEYS[2], all[i])
    elseif u > latest then latest = u end
  end
  redis.call('PEXPIRE', KEYS[2], math.ceil((latest - now) * 1000))
  return {fmt(until_), new}
end
"""

# ARGV: method, until ('' = unknown), bucket, slack, max_ahead.
_PAUSE_ONLY_LUA = _PAUSE_LUA + """
return pause(ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]))
"""

# ARGV: method, operating, reset_at ('' = none), threshold, window, bucket, slack.
# Overwrites the usage figures (the server's number is already the running total); pauses at the threshold.
_RECORD_LUA = _PAUSE_LUA + """
local operating, reset_at = tonumber(ARGV[2]), tonumber(ARGV[3])
local window = tonumber(ARGV[5])
redis.call('DEL', KEYS[3])
redis.call('HSET', KEYS[3], 'operating', fmt(operating), 'recorded_at', fmt(now))
if reset_at ~= nil then redis.call('HSET', KEYS[3], 'reset_at', fmt(reset_at)) end
redis.call('PEXPIRE', KEYS[3], math.ceil(window * 1000))
if operating < tonumber(ARGV[4]) then return false end
return pause(ARGV[1], reset_at, tonumber(ARGV[6]), tonumber(ARGV[7]), window)
"""

# KEYS: index hash. Returns the fields whose pause is still ahead, as a flat list.
_PAUSES_LUA = _LUA_NOW + """
local all = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #all, 2 do
  if tonumber(all[i + 1]) > now then out[#out + 1] = all[i]; out[#out + 1] = all[i + 1] end
end
return out
"""


# One round trip before each call: which of the call's methods are paused, and which pauses ended since
# a process last looked (HDEL answers 1 to exactly one caller, so exactly one process logs the end).
_CHECK_LUA = """
local out = {}
local announced = KEYS[#KEYS]
for i, method in ipairs(ARGV) do
  local until_ = redis.call('GET', KEYS[i])
  if until_ then
    table.insert(out, method)
    table.insert(out, until_)
  elseif redis.call('HDEL', announced, method) == 1 then
    table.insert(out, method)
    table.insert(out, '')
  end
end
return out
"""


class OperatingBudget:
    """One portal's per-method operating-time budget, shared through Redis.

    Keys (all expire on their own), with `{portal}` as a Redis Cluster hash tag:
    * `<prefix>:{<portal>}:pause:<method>`: the unix time the method may resume; expires then.
    * `<prefix>:{<portal>}:pauses`: hash method -> resume time, for listing; expires with the last pause.
    * `<prefix>:{<portal>}:usage:<method>`: the latest operating figures; expires after one window.

    Method names are compared lower-case (Bitrix24 method names are case-insensitive).
    All times are Redis server unix time, so every machine agrees.
    """

    def __init__(self, redis: redis.Redis, portal: str, limit: float = DEFAULT_OPERATING_LIMIT,
                 window: float = DEFAULT_OPERATING_WINDOW, margin: float = DEFAULT_OPERATING_MARGIN,
                 key_prefix: str = "b24c:operating", resume_slack: float = DEFAULT_RESUME_SLACK) -> None:
        if window <= 0 or limit <= 0:
            raise ValueError(f"limit and window must be > 0, got limit={limit} window={window}")
        if not 0 <= margin < limit:
            raise ValueError(f"margin must be in [0, limit), got {margin}")
        if resume_slack < 0:
            raise ValueError(f"resume_slack must be >= 0, got {resume_slack}")
        self.redis = redis
        self.portal = _check_name("portal", portal)
        self.limit = float(limit)
        self.window = float(window)
        self.margin = float(margin)
        self.threshold = self.limit - self.margin  # pause once the server-reported total reaches this
        self.bucket = self.window / OPERATING_BUCKETS  # fallback pause when the reset time is unknown
        self.resume_slack = float(resume_slack)
        self._base = f"{key_prefix}:{{{portal}}}"
        self._record = redis.register_script(_RECORD_LUA)
        self._pause = redis.register_script(_PAUSE_ONLY_LUA)
        self._pauses = redis.register_script(_PAUSES_LUA)
        self._check = redis.register_script(_CHECK_LUA)

    def _keys(self, method: str) -> list[str]:
        return [f"{self._base}:pause:{method}", f"{self._base}:pauses", f"{self._base}:usage:{method}"]

    @staticmethod
    def _method(method: str) -> str:
        return _check_name("method", method.strip().lower())

    def record(self, method: str, operating: float | None, reset_at: float | None) -> Pause | None:
        """Store an answer's `time.operating` / `time.operating_reset_at` for `method`.

        The figure overwrites the last one (the server reports the running total of the window).
        If it reaches limit - margin, the method is paused until `reset_at` (or one bucket, window/10,
        from now if missing or past) plus the resume slack, and the `Pause` is returned; else None.
        An answer without `operating` records nothing and returns None. A pause is never shortened.
        """
        if operating is None:
            return None
        name = self._method(method)
        reply = self._record(keys=self._keys(name), args=[
            name, repr(float(operating)), "" if reset_at is None else repr(float(reset_at)),
            repr(self.threshold), repr(self.window), repr(self.bucket), repr(self.resume_slack)])
        return self._to_pause(name, reply) if reply else None

    def pause(self, method: str, until: float | None = None) -> Pause:
        """Pause `method` at once (on a 429 OPERATION_TIME_LIMIT) and return the pause in force.

        `until`: the answer's `operating_reset_at`. If None or already past, the last recorded reset time
        is used if still ahead, else one bucket (window/10) from now. The resume slack is added; the
        pause is capped at one window ahead and never shortens a longer pause already in force.
        """
        name = self._method(method)
        reply = self._pause(keys=self._keys(name), args=[
            name, "" if until is None else repr(float(until)), repr(self.bucket), repr(self.resume_slack),
            repr(self.window)])
        return self._to_pause(name, reply)

    @staticmethod
    def _to_pause(method: str, reply: list[bytes | str]) -> Pause:
        until, new = (_text(v) for v in reply)
        return Pause(method=method, until=float(until), new=new == "1")

    def paused_until(self, method: str) -> float | None:
        """The unix time `method` may resume, or None if it is not paused (one GET)."""
        value = self.redis.get(self._keys(self._method(method))[0])
        return float(_text(value)) if value is not None else None

    def check(self, methods: list[str]) -> tuple[dict[str, float], list[str]]:
        """For a call's methods, in one round trip: those paused now (with their resume time), and those
        whose announced pause has ended since (reported to exactly one caller, to log it once)."""
        names = [self._method(method) for method in methods]
        keys = [self._keys(name)[0] for name in names] + [f"{self._base}:announced"]
        flat = [_text(v) for v in self._check(keys=keys, args=names)]
        paused: dict[str, float] = {}
        resumed: list[str] = []
        for i in range(0, len(flat), 2):
            if flat[i + 1]:
                paused[flat[i]] = float(flat[i + 1])
            else:
                resumed.append(flat[i])
        return paused, resumed

    def announce(self, method: str) -> None:
        """Note that a pause of `method` was logged, so that its end is logged once too."""
        key = f"{self._base}:announced"
        with self.redis.pipeline() as pipe:
            pipe.hset(key, self._method(method), "1")
            pipe.expire(key, int(self.window * 2))
            pipe.execute()

    def pauses(self) -> dict[str, float]:
        """Every method of this portal paused now, with the unix time it may resume."""
        flat = [_text(v) for v in self._pauses(keys=[f"{self._base}:pauses"])]
        return {flat[i]: float(flat[i + 1]) for i in range(0, len(flat), 2)}

    def usage(self, method: str) -> Usage | None:
        """The latest figures recorded for `method` in the last window, or None."""
        raw = self.redis.hgetall(self._keys(self._method(method))[2])
        fields = {_text(k): _text(v) for k, v in raw.items()}
        if "operating" not in fields:
            return None
        reset_at = fields.get("reset_at")
        return Usage(operating=float(fields["operating"]), reset_at=float(reset_at) if reset_at else None,
                     recorded_at=float(fields["recorded_at"]))
