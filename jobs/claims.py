"""One document, one cancel in flight: a claim per (portal, document) in Redis, across requests and machines.

A request takes a document's claim (its request id, SET NX) before it reads the document for a cancel and
keeps it until that document's outcome is decided. Only the holder sends `catalog.document.cancel` for the
document; another request naming it waits, then decides on what it reads. The claim outlives a call that got
no answer until that call can no longer be running on the portal (the ambiguity rule), so no second cancel
goes out beside it, even if the job that sent it died.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import redis
from redis.client import Pipeline

from bitrix24.client import CALL_DEADLINE_SECONDS
from jobs import policy
from jobs.durability import durable

KEY_PREFIX = "b24c:claim:"

# For each document: take the claim if free (new), extend it if ours (kept), else name the holder. One
# script so that a claim is never extended after another request took it.
TAKE_LUA = """
local result = {}
for i, key in ipairs(KEYS) do
  if redis.call('SET', key, ARGV[1], 'NX', 'PX', ARGV[2]) then
    result[i] = 'new'
  elseif redis.call('GET', key) == ARGV[1] then
    if redis.call('PTTL', key) < tonumber(ARGV[2]) then
      redis.call('PEXPIRE', key, ARGV[2])
    end
    result[i] = 'kept'
  else
    result[i] = redis.call('GET', key) or ''
  end
end
return result
"""
RELEASE_LUA = """
local released = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    released = released + redis.call('DEL', key)
  end
end
return released
"""


def claim_key(portal: str, doc_id: int) -> str:
    """The Redis key of a document's claim."""
    return f"{KEY_PREFIX}{portal}:{int(doc_id)}"


def claim_seconds(execution_limit: float) -> float:
    """How long a claim lives after it is taken or extended: the read before the cancel and the cancel call
    (each within the client's deadline), the portal's execution limit and margin after the send (the
    ambiguity rule), and room for the job to come back and read the outcome."""
    return 2 * CALL_DEADLINE_SECONDS + execution_limit + policy.AMBIGUITY_MARGIN + policy.CLAIM_SLACK


@dataclass
class Taken:
    """What taking claims found: documents newly ours, ours already, and the others' (doc id -> holder)."""

    new: set[int] = field(default_factory=set)
    kept: set[int] = field(default_factory=set)
    others: dict[int, str] = field(default_factory=dict)

    @property
    def ours(self) -> set[int]:
        return self.new | self.kept


class Claims:
    """One request's claims on the documents of one portal."""

    def __init__(self, conn: redis.Redis, portal: str, request_id: str, execution_limit: float,
                 replicas: int = 0) -> None:
        self.conn = conn
        self.portal = portal
        self.request_id = request_id
        self.execution_limit = execution_limit
        self.replicas = replicas

    def take(self, doc_ids: Iterable[int], extra: float = 0.0) -> Taken:
        """Take or extend the claims (living `extra` seconds longer than usual), durably: a claim a failover
        could lose must not let a cancel out."""
        ids = [int(doc_id) for doc_id in doc_ids]
        taken = Taken()
        if not ids:
            return taken
        [answers] = durable(self.conn, self.replicas, lambda pipe: self.queue_take(pipe, ids, extra))
        for doc_id, answer in zip(ids, answers, strict=True):
            holder = answer.decode() if isinstance(answer, bytes) else str(answer)
            if holder == "new":
                taken.new.add(doc_id)
            elif holder == "kept":
                taken.kept.add(doc_id)
            else:
                taken.others[doc_id] = holder
        return taken

    def queue_take(self, pipe: Pipeline, doc_ids: list[int], extra: float = 0.0) -> None:
        """Add the take script to a pipeline (to go with another guarding write and one WAIT)."""
        ttl_ms = int((claim_seconds(self.execution_limit) + max(extra, 0.0)) * 1000)
        pipe.eval(TAKE_LUA, len(doc_ids), *[claim_key(self.portal, d) for d in doc_ids], self.request_id, ttl_ms)

    def release(self, doc_ids: Iterable[int]) -> int:
        """Give back the claims that are still ours (a lost release only makes others wait for the TTL)."""
        keys = [claim_key(self.portal, int(doc_id)) for doc_id in doc_ids]
        if not keys:
            return 0
        return int(self.conn.eval(RELEASE_LUA, len(keys), *keys, self.request_id))

    def remaining(self, doc_ids: Iterable[int]) -> float:
        """Seconds until the soonest of these claims expires (0 when one is already free)."""
        soonest: float | None = None
        for doc_id in doc_ids:
            ms = self.conn.pttl(claim_key(self.portal, int(doc_id)))
            seconds = max(ms, 0) / 1000
            soonest = seconds if soonest is None else min(soonest, seconds)
        return soonest or 0.0
