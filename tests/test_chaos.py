"""The chaos run, short: exactly once while Bitrix24 fails, a worker and a work-horse die, Redis restarts and fails over.

The same harness as `python -m bench chaos` (bench/chaos.py), scaled down: 80 requests over 45 s with
sandbox faults on every cancel batch and report post, 2 workers, a worker SIGKILLed at 15 s and a
work-horse at 30 s, the Redis primary SIGKILLed and restarted on its AOF at 22.5 s, and a Sentinel failover
at 37.5 s. Every accepted request must then end within 120 s, with one effective cancel per document, no
second cancel in flight, exactly one report each and none lost, all read from the sandbox's own records.
"""

from __future__ import annotations

from bench import chaos

# Small enough for the suite (about 1 minute when the service keeps up, 3 at most), large enough that each
# fault kind fires on some call and a few requests name the same document.
SHORT = chaos.ChaosConfig(requests=80, duration=45.0, kill_interval=15.0, workers=2, seed=7, overlap=0.05,
                          settle=chaos.SETTLE, sentinel=True)


def test_chaos_run_keeps_exactly_once() -> None:
    result = chaos.run(SHORT)

    assert result.start_error is None, result.start_error
    # The chaos really happened: faults of every kind fired, and each crash was dealt.
    for kind in ("error500", "applied_then_timeout", "drop", f"slow {chaos.LONG_STALL:g} s"):
        assert result.faults_fired.get(kind, 0) > 0, f"no {kind} fault fired: {result.faults_fired}"
    assert result.worker_kills == 1 and result.horse_kills == 1, (result.worker_kills, result.horse_kills)
    assert result.redis_restarts == 1 and result.failovers == 1, (result.redis_restarts, result.failovers)
    # And exactly once held through it, from the sandbox's documents, chat and call log.
    assert result.accepted == result.sent == SHORT.requests
    assert result.ended == result.accepted, f"{result.accepted - result.ended} requests did not end in time"
    assert result.cancelled_twice == 0
    assert result.sent_while_running == 0
    assert result.one_report == result.accepted
    assert result.lost == 0
    assert result.passed
