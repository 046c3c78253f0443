"""Offline events: pulling an installed portal's queue, one request per record, nothing lost, nothing doubled.

A rule with `delivery = "offline"` makes the installer bind its event offline: the portal keeps a queue, one
record per object (reference §2.4). `pull_offline` drains it. It runs when ONOFFLINEEVENT arrives (the web
process enqueues it) and on a schedule (RQ's scheduler, every B24_OFFLINE_POLL seconds; each scheduled pass
schedules the next, and the workers' maintenance starts the chain again if it was lost), so records that
piled up while the service was down are taken after a restart without any notice.

With reserve/confirm (`rest_offline_extended`), a pass:
1. holds the portal's pull lease (one pass per portal across every worker and machine);
2. uses the portal's process_id, written to Redis (durably) before the first `event.offline.get`;
3. `event.offline.get(clear=0, process_id, limit=50)`: the records reserved under that process_id, first
   those a pass that died reserved, then new ones;
4. submits each record through the intake's submit script, keyed by the portal, the record's MESSAGE_ID
   and its ID (a second read of the same record is the same request; a later change of the same object,
   which the portal keeps as a new record under the same MESSAGE_ID, is a new one);
5. confirms exactly the records it handled: `event.offline.clear(process_id, id=[...])`.
A worker killed anywhere leaves the records reserved under the stored process_id, and the next pass reads
them again: their submits are repeats, and the clear follows. A record that cannot become a request
(malformed, or no rule for its event) is confirmed too and counted; a transient failure (Redis, the portal)
stops the pass before the clear, so the batch stays reserved for the next one. A get that got no answer may
still reserve records later under the same process_id: the next pass's get returns them, and the clear names
ids, so they are never confirmed unseen.

Without reserve/confirm (feature.get at install says N, or clear=0 is refused), a pass reads with `clear=1`:
the portal deletes what it hands out. The batch is written to Redis in one step the moment the answer is
read, then each record is submitted and struck off; a pass that dies after that step is finished by the next
one. The remaining window (README): an answer lost on its way (timeout, dropped connection) or a worker
killed between receiving the answer and that one write loses up to 50 records.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import uuid
from datetime import datetime, timedelta
from typing import Any

import redis
from rq import Queue, Retry
from rq.serializers import JSONSerializer

from bitrix24.client import Bitrix24Client
from bitrix24.errors import Bitrix24Error, Throttled
from jobs import policy, records
from jobs.context import job_connection, worker_context
from jobs.durability import NotReplicated, durable
from jobs.enqueue import ON_FAILURE, Submitter
from jobs.lifecycle import Lease, LeaseLost, _current_lease, reschedule
from registry import MEMBER_ID, installed_name
from settings import BITRIX24_CALLER, Portal, Settings

log = logging.getLogger("b24cancel.jobs")

STATE_KEY = "b24c:offline:"
STASH_KEY = "b24c:offline:stash:"
POLL_KEY = "b24c:offline:poll:"
PENDING_KEY = "b24c:offline:pending:"
PULL_JOB = "jobs.offline.pull_offline"
NOTICE_EVENT = "ONOFFLINEEVENT"
# Records per get (the documented default and what a batch is).
LIMIT = 50
# Batches per pass: a long queue is drained over several passes, each under a fresh lease.
MAX_BATCHES = 20
LEASE_SECONDS = 15.0
# A scheduled poll's marker outlives its due time by this much before maintenance schedules another.
POLL_GRACE = 30
PENDING_SECONDS = 300
# ONOFFLINEEVENT: at most one notice per this many seconds (event.bind options.minTimeout).
NOTICE_MIN_TIMEOUT = 1
EVENT_NAME = re.compile(r"[A-Z0-9_.]{1,100}", re.ASCII)
OBJECT_ID = re.compile(r"[0-9]{1,18}", re.ASCII)
RECORD_ID = re.compile(r"[0-9]{1,20}", re.ASCII)
MESSAGE_ID = re.compile(r"[\x21-\x7e]{1,100}", re.ASCII)


def state_key(member_id: str) -> str:
    """The Redis hash of a portal's offline queue: process_id, mode and the counts shown to operators."""
    return STATE_KEY + member_id


def keys_of(member_id: str) -> list[str]:
    """Every key the offline queue keeps for a portal (deleted on uninstall)."""
    return [STATE_KEY + member_id, STASH_KEY + member_id, POLL_KEY + member_id, PENDING_KEY + member_id]


def offline_events(rules: tuple[dict[str, Any], ...] | list[dict[str, Any]]) -> set[str]:
    """The events the rules want delivered offline."""
    return {rule["event"] for rule in rules if rule.get("delivery") == "offline"}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -- starting passes ---------------------------------------------------------------------------------------

def _enqueue(conn: redis.Redis, member_id: str, why: str, job_id: str, delay: float = 0) -> None:
    q = Queue(policy.CANCEL_QUEUE, connection=conn, serializer=JSONSerializer)
    options: dict[str, Any] = {"job_id": job_id, "job_timeout": policy.JOB_TIMEOUT, "result_ttl": 600,
                               "failure_ttl": policy.FAILURE_TTL, "on_failure": ON_FAILURE,
                               "retry": Retry(max=policy.CRASH_RETRY_MAX, interval=policy.CRASH_RETRY_INTERVALS)}
    if delay > 0:
        q.enqueue_in(timedelta(seconds=delay), PULL_JOB, member_id, why, **options)
    else:
        q.enqueue(PULL_JOB, member_id, why, **options)


def request_pull(conn: redis.Redis, member_id: str) -> bool:
    """ONOFFLINEEVENT: enqueue a pass unless one is already waiting to run (a running one does not count: it
    may have read the queue before the new records came). Returns whether a pass was enqueued."""
    if not conn.set(PENDING_KEY + member_id, "1", nx=True, ex=PENDING_SECONDS):
        return False
    _enqueue(conn, member_id, "notice", f"offline-notice-{member_id}-{uuid.uuid4().hex[:12]}")
    return True


def schedule_poll(conn: redis.Redis, member_id: str, delay: float, poll: int) -> bool:
    """Schedule the next scheduled pass in `delay` seconds, unless one is scheduled already."""
    job_id = f"offline-poll-{member_id}-{uuid.uuid4().hex[:12]}"
    if not conn.set(POLL_KEY + member_id, job_id, nx=True, ex=math.ceil(delay) + max(POLL_GRACE, poll)):
        return False
    _enqueue(conn, member_id, "poll", job_id, delay)
    return True


def keep_polling(conn: redis.Redis, settings: Settings) -> int:
    """From the workers' maintenance: start the schedule of every installed portal with offline rules that has
    no pass scheduled (first start, a restart after a long stop, or a lost job). Returns how many started."""
    app = settings.app
    if app is None or not offline_events(app.rules):
        return 0
    started = 0
    for raw in conn.smembers("b24c:app:portals"):
        member_id = _text(raw)
        if MEMBER_ID.fullmatch(member_id) and schedule_poll(conn, member_id, 0, settings.b24_offline_poll):
            started += 1
    return started


# -- the pass ----------------------------------------------------------------------------------------------

def pull_offline(member_id: str, why: str = "notice") -> dict[str, Any] | Retry:
    """Drain an installed portal's offline queue (see the module's docstring)."""
    conn = job_connection()
    ctx = worker_context()
    app = ctx.settings.app
    portal = ctx.portal(installed_name(member_id), conn) if app is not None else None
    if portal is None or not offline_events(portal.rules):
        conn.delete(PENDING_KEY + member_id)
        return {"skipped": "not installed or no offline rule"}
    if why == "poll":
        _next_poll(conn, member_id, ctx.settings.b24_offline_poll)
    lease = Lease(conn, "offline", member_id, seconds=LEASE_SECONDS)
    if not lease.acquire():
        if why == "poll":
            return {"skipped": "another pass holds the portal's queue"}
        # A notice's pass waits for the running one: records may have come after it read the queue.
        conn.expire(PENDING_KEY + member_id, PENDING_SECONDS)
        remaining = conn.pttl(lease.key)
        return reschedule(max(1, math.ceil(remaining / 1000)) if remaining and remaining > 0 else 1, 1)
    conn.delete(PENDING_KEY + member_id)
    lease.start_heartbeat()
    current = _current_lease.set(lease)
    try:
        result = Puller(conn, ctx, portal, member_id).run()
    except LeaseLost:
        log.warning("offline pass stopped: its lease was lost", extra={"portal": portal.name})
        return {"stopped": "lease lost"}
    finally:
        _current_lease.reset(current)
        lease.stop_heartbeat()
        lease.release()
    if result.get("more"):
        request_pull(conn, member_id)  # a long queue: the next pass follows at once, under its own lease
    return result


def _next_poll(conn: redis.Redis, member_id: str, poll: int) -> None:
    """A scheduled pass: free its marker (if it is still this job's) and schedule the next one."""
    from rq import get_current_job

    job = get_current_job()
    marker = conn.get(POLL_KEY + member_id)
    if marker is not None and job is not None and _text(marker) == job.id:
        conn.delete(POLL_KEY + member_id)
    schedule_poll(conn, member_id, poll, poll)


class Stop(Exception):
    """The pass ends here; what is reserved stays reserved for the next one."""


class Puller:
    """One pass over one portal's queue."""

    def __init__(self, conn: redis.Redis, ctx: Any, portal: Portal, member_id: str) -> None:
        self.conn = conn
        self.ctx = ctx
        self.portal = portal
        self.member_id = member_id
        self.key = state_key(member_id)
        self.replicas = ctx.settings.redis_min_replicas
        self.client: Bitrix24Client = ctx.client(portal, conn)
        self.submitter = Submitter(conn, ctx.settings.request_ttl, self.replicas)
        self.events = {rule["event"] for rule in portal.rules}
        self.done = {"batches": 0, "records": 0, "requests": 0}

    def run(self) -> dict[str, Any]:
        try:
            for _ in range(MAX_BATCHES):
                mode = _text(self.conn.hget(self.key, "mode") or b"reserve")
                count = self.clear_batch() if mode == "clear" else self.reserve_batch()
                self.done["batches"] += 1
                if count < LIMIT:
                    break
            else:
                self.done["more"] = 1
        except Stop as stop:
            self.conn.hset(self.key, mapping={"last_error": str(stop), "last_error_at": f"{time.time():.3f}"})
            log.warning("offline pass stopped; the rest waits for the next pass",
                        extra={"portal": self.portal.name, "why": str(stop)})
            return {**self.done, "stopped": str(stop)}
        self.conn.hset(self.key, "last_error", "")
        return self.done

    # -- with reserve/confirm ----------------------------------------------------------------------------

    def process_id(self) -> str:
        """The portal's process_id, written to Redis before any get that uses it."""
        stored = self.conn.hget(self.key, "process_id")
        if stored:
            return _text(stored)
        chosen = uuid.uuid4().hex
        try:
            [_, added] = durable(self.conn, self.replicas,
                                 lambda pipe: (pipe.hsetnx(self.key, "process_id", chosen),
                                               pipe.hget(self.key, "process_id")))
        except NotReplicated:
            raise Stop("the process_id was not confirmed by a Redis replica") from None
        return _text(added)

    def reserve_batch(self) -> int:
        process_id = self.process_id()
        try:
            answer = self.call("event.offline.get", {"clear": 0, "process_id": process_id, "limit": LIMIT})
        except Bitrix24Error as err:
            if err.code == "ACCESS_DENIED" and not self.extended():
                self.conn.hset(self.key, "mode", "clear")
                log.warning("the portal's plan has no reserve/confirm for offline events; reading with clear=1",
                            extra={"portal": self.portal.name})
                return LIMIT  # the loop goes on, in the other mode
            raise Stop(f"event.offline.get: {err.code}: {err.description}") from None
        events = self.events_of(answer)
        self.conn.hset(self.key, mapping={"last_pull_at": f"{time.time():.3f}"})
        self.conn.hincrby(self.key, "pulled", len(events))
        self.settle_unanswered_clear(events)
        if not events:
            return 0
        ids = []
        for record in events:
            self.take(record)
            if RECORD_ID.fullmatch(str(record.get("ID", ""))) if isinstance(record, dict) else False:
                ids.append(str(record["ID"]))
        params: dict[str, Any] = {"process_id": process_id}
        if len(ids) == len(events):
            params["id"] = ids  # exactly these: a late get's records under this process_id stay for the next pass
        # Noted first: if the clear gets no answer, the next read shows which of these it confirmed.
        self.conn.hset(self.key, "clearing", json.dumps(ids))
        try:
            self.call("event.offline.clear", params)
        except Bitrix24Error as err:
            raise Stop(f"event.offline.clear: {err.code}: {err.description}") from None
        pipe = self.conn.pipeline(transaction=True)
        pipe.hincrby(self.key, "confirmed", len(events))
        pipe.hdel(self.key, "clearing")
        pipe.execute()
        return len(events)

    def settle_unanswered_clear(self, events: list[Any]) -> None:
        """Count what an unanswered clear confirmed: the ids it named that are no longer reserved for us."""
        raw = self.conn.hget(self.key, "clearing")
        if raw is None:
            return
        named = set(json.loads(raw))
        still = {str(record.get("ID")) for record in events if isinstance(record, dict)}
        pipe = self.conn.pipeline(transaction=True)
        pipe.hincrby(self.key, "confirmed", len(named - still))
        pipe.hdel(self.key, "clearing")
        pipe.execute()

    def extended(self) -> bool:
        """Whether the plan has reserve/confirm (`feature.get rest_offline_extended`), asked after a refusal."""
        try:
            value = self.call("feature.get", {"CODE": "rest_offline_extended"})
        except Bitrix24Error:
            return True  # not known: keep reserving (the refusal is then reported as it is)
        return isinstance(value, dict) and str(value.get("value", "")).upper() == "Y"

    # -- without it: clear=1 -------------------------------------------------------------------------------

    def clear_batch(self) -> int:
        stash_key = STASH_KEY + self.member_id
        left = self.conn.hgetall(stash_key)
        for raw_id, raw in sorted(left.items()):
            self.take(json.loads(raw))
            self.conn.hdel(stash_key, raw_id)
        try:
            answer = self.call("event.offline.get", {"clear": 1, "limit": LIMIT})
        except Bitrix24Error as err:
            if err.ambiguous:
                # The portal may have deleted what it handed out: this is the documented loss window.
                self.conn.hincrby(self.key, "unanswered_reads", 1)
            raise Stop(f"event.offline.get (clear=1): {err.code}: {err.description}") from None
        events = self.events_of(answer)
        now = f"{time.time():.3f}"
        pipe = self.conn.pipeline(transaction=True)
        stash: dict[Any, Any] = {_stash_id(record, index): json.dumps(record) for index, record in enumerate(events)}
        if stash:
            pipe.hset(stash_key, mapping=stash)
        pipe.hset(self.key, "last_pull_at", now)
        pipe.hincrby(self.key, "pulled", len(events))
        pipe.hincrby(self.key, "confirmed", len(events))  # the portal deleted them on read
        pipe.execute()
        for stash_id, raw in stash.items():
            self.take(json.loads(raw))
            self.conn.hdel(stash_key, stash_id)
        return len(events)

    # -- shared ---------------------------------------------------------------------------------------------

    def call(self, method: str, params: dict[str, Any]) -> Any:
        """A call through the shared limiter; limits that hold it back end the pass (the batch stays)."""
        try:
            return self.client.call(method, params).result
        except Throttled as wait:
            raise Stop(f"{method}: {wait.reason}") from None

    @staticmethod
    def events_of(answer: Any) -> list[Any]:
        events = answer.get("events") if isinstance(answer, dict) else None
        if not isinstance(events, list):
            raise Stop("event.offline.get answered without an events list")
        return events

    def take(self, record: Any) -> None:
        """One record: a request through the intake's submit (a repeat is the same request), or counted and
        confirmed when it cannot be one. Raises Stop on a transient failure."""
        request_, key, outcome = self.request_of(record)
        if request_ is None:
            self.ctx.tally.observe("offline_records", self.portal.name, outcome)
            self.conn.hincrby(self.key, outcome, 1)
            log.info("offline record confirmed without a request", extra={"portal": self.portal.name,
                                                                           "why": outcome})
            return
        request_id = records.new_request_id()
        idem = records.idempotency_key(self.portal.name, "event", BITRIX24_CALLER, key)
        try:
            result = self.submitter.submit(request_id, request_, policy.FIRST_JOBS["resolve"],
                                           policy.first_job_id("resolve", request_id), idempotency_key=idem)
        except (NotReplicated, redis.RedisError) as exc:
            raise Stop(f"submitting a record: {type(exc).__name__}") from None
        if result.outcome == "conflict":
            raise Stop("submitting a record: the new request's keys existed")
        outcome = "request" if result.created else "repeat"
        self.ctx.tally.observe("offline_records", self.portal.name, outcome)
        if result.created:
            self.conn.hincrby(self.key, "requests", 1)
            self.done["requests"] += 1
        self.done["records"] += 1

    def request_of(self, record: Any) -> tuple[dict[str, Any] | None, str, str]:
        """(request, idempotency key, "") for a good record; (None, "", why) for one that is not."""
        if not isinstance(record, dict):
            return None, "", "malformed"
        name = str(record.get("EVENT_NAME") or "").strip().upper()
        data = record.get("EVENT_DATA")
        fields = data.get("FIELDS") if isinstance(data, dict) else None
        raw_id = str(fields.get("ID", "")).strip() if isinstance(fields, dict) else ""
        message = str(record.get("MESSAGE_ID") or "")
        record_id = str(record.get("ID") or "")
        if not (EVENT_NAME.fullmatch(name) and OBJECT_ID.fullmatch(raw_id) and MESSAGE_ID.fullmatch(message)
                and RECORD_ID.fullmatch(record_id)):
            return None, "", "malformed"
        if name not in self.events:
            return None, "", "no_rule"
        request_: dict[str, Any] = {"portal": self.portal.name, "source": "event", "event": name,
                                    "object_id": int(raw_id), "ts": _unix(record.get("TIMESTAMP_X")),
                                    "delivery": "offline", "offline_record": record_id}
        return request_, f"offline|{message}|{record_id}", ""


def _stash_id(record: Any, index: int) -> str:
    """A stashed record's field: its ID, or a fresh name for one without a usable ID (counted as malformed)."""
    record_id = str(record.get("ID", "")) if isinstance(record, dict) else ""
    return record_id if RECORD_ID.fullmatch(record_id) else f"x{index}-{uuid.uuid4().hex[:8]}"


def _unix(value: Any) -> str | None:
    try:
        return str(int(datetime.fromisoformat(str(value)).timestamp()))
    except ValueError:
        return None


# -- what operators see ------------------------------------------------------------------------------------

def view(conn: redis.Redis, member_id: str) -> dict[str, Any]:
    """The offline queue's state for /v1/portals and /v1/health: mode, last pull, counts, last error."""
    raw = {_text(k): _text(v) for k, v in conn.hgetall(state_key(member_id)).items()}
    last = raw.get("last_pull_at")
    return {"mode": raw.get("mode") or "reserve", "last_pull_at": records.iso(float(last)) if last else None,
            "pulled": int(raw.get("pulled") or 0), "confirmed": int(raw.get("confirmed") or 0),
            "requests": int(raw.get("requests") or 0),
            "ignored": int(raw.get("malformed") or 0) + int(raw.get("no_rule") or 0),
            "unanswered_reads": int(raw.get("unanswered_reads") or 0),
            "waiting_in_stash": int(conn.hlen(STASH_KEY + member_id)),
            "last_error": raw.get("last_error") or None}
