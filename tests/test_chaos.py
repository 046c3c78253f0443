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


def _cancel(seq: int, doc: int, when: float, applied: bool, batch: int | None) -> dict[str, object]:
    return {"seq": seq, "time": when, "method": "catalog.document.cancel", "params": {"id": str(doc)},
            "batch": batch, "applied": applied}


def test_chaos_checks_count_what_breaks_the_promises() -> None:
    # The sandbox's call log shape: HTTP requests (batch None) and the cancel commands inside them.
    calls = [
        {"seq": 1, "time": 100.0, "method": "batch", "params": {}, "batch": None, "applied": True},
        _cancel(2, 7, 104.5, True, 1),            # doc 7: a slow batch, applied 4.5 s after it arrived
        {"seq": 3, "time": 103.0, "method": "batch", "params": {}, "batch": None, "applied": True},
        _cancel(4, 7, 103.0, False, 3),           # sent again while the first had not run: refused, but in flight
        _cancel(5, 8, 110.0, True, None),         # doc 8: cancelled twice
        _cancel(6, 8, 120.0, True, None),
        _cancel(7, 9, 130.0, True, None),         # doc 9: once, as it should be
    ]
    by_doc = chaos.cancel_calls(calls)
    assert [chaos.sent_while_running(by_doc[d]) for d in (7, 8, 9)] == [1, 0, 0]
    assert [sum(applied for _, _, applied in by_doc[d]) for d in (7, 8, 9)] == [1, 2, 1]

    a, b, c = "a" * 32, "b" * 32, "c" * 32
    messages = [{"message": f"Cancelled #1 ... #{a}"}, {"message": f"#{b}/2 again"}, {"message": f"#{b}"},
                {"message": f"not ours: {'d' * 32}, nor {a}0"}]
    reports = chaos.reports_by_request(messages, {a, b, c})
    assert (reports[a], reports[b], reports[c]) == (1, 2, 0)


def test_fault_rules_give_each_fault_its_share() -> None:
    rules = chaos.fault_rules()
    for method in chaos.FAULTED_METHODS:
        mine = [r for r in rules if r["method"] == method]
        left, shares = 1.0, []
        for rule in mine:  # the sandbox tries rules in order; a rule sees only what the earlier ones let through
            shares.append(round(left * rule["rate"], 6))
            left *= 1 - rule["rate"]
        assert shares == [share for _, share, _ in chaos.FAULTS]
    assert all(r.get("seconds", 0) <= chaos.EXECUTION_LIMIT for r in rules)
