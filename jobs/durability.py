"""Writes that must survive a Redis failover before the effect they guard happens.

With `REDIS_MIN_REPLICAS` > 0, a write that guards an effect outside Redis (the document claim, the
"sent" note before a call, the report nonce) is followed by `WAIT` on the same connection, in the same
pipeline: if fewer replicas confirm it in time, the write may be lost in a failover, so the caller must
not make the effect (it raises `NotReplicated`, a transient failure). With 0 it is a plain write.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis
from redis.client import Pipeline

from jobs import policy


class NotReplicated(redis.RedisError):
    """Fewer replicas than REDIS_MIN_REPLICAS confirmed a write in time; it may not survive a failover."""


def durable(conn: redis.Redis, replicas: int, write: Callable[[Pipeline], Any]) -> list[Any]:
    """Run `write(pipe)` on one non-transactional pipeline, then WAIT for `replicas` (one round trip).

    Returns the pipeline's results without the WAIT's; raises NotReplicated when too few confirmed.
    """
    pipe = conn.pipeline(transaction=False)
    write(pipe)
    if replicas > 0:
        pipe.execute_command("WAIT", replicas, policy.REPLICA_WAIT_MS)
    results = pipe.execute()
    if replicas > 0:
        confirmed = int(results.pop())
        if confirmed < replicas:
            raise NotReplicated(f"{confirmed} of {replicas} replicas confirmed the write")
    return results
