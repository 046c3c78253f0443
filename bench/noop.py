"""No-op jobs for the RQ baselines of the benchmarks.

`jobs.policy.cancel_job_id` (a one-line function in a module the worker preloads) is the one-hop no-op:
it costs the work-horse nothing, not even an import. `chain` is the two-hop no-op, shaped like our flow
(the cancel job enqueues the report job): it enqueues that no-op on the `notify` queue. Its horse
imports this small module, which the worker parent has not preloaded (well under a millisecond).
"""

from __future__ import annotations

from rq import Queue, get_current_job
from rq.serializers import JSONSerializer

ONE_HOP = "jobs.policy.cancel_job_id"
TWO_HOP = "bench.noop.chain"


def second_hop_id(job_id: str) -> str:
    return f"{job_id}-2"


def chain(tag: str) -> str:
    """Enqueue the second no-op hop on the notify queue, as cancel_documents enqueues post_report."""
    job = get_current_job()
    assert job is not None
    queue = Queue("notify", connection=job.connection, serializer=JSONSerializer)
    queue.enqueue(ONE_HOP, tag, job_id=second_hop_id(job.id))
    return tag
