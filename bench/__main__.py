"""`python -m bench` (what `make bench` runs after installing wrk): every benchmark, one after the other.

`python -m bench NAME ...` runs the named ones only (intake, latency, worker, limits, events, sandbox, slowloris, contract, chaos).
Each starts its own processes on free loopback ports, stops them by PID, and prints its figures and
ratios as its last lines.
"""

from __future__ import annotations

import importlib
import sys

BENCHES = ("intake", "latency", "worker", "limits", "events", "sandbox", "slowloris", "contract", "chaos")


def main(names: list[str]) -> int:
    unknown = [name for name in names if name not in BENCHES]
    if unknown:
        print(f"unknown bench {unknown[0]!r}; choose from {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    failed = []
    for name in names or BENCHES:
        print(f"\n===== bench.{name} =====", flush=True)
        module = importlib.import_module(f"bench.{name}")
        saved, sys.argv = sys.argv, [f"bench.{name}"]
        try:
            code = module.main()
        finally:
            sys.argv = saved
        if code:
            failed.append(name)
    print(f"\nbenches failed: {', '.join(failed)}" if failed else "\nall benches ran")
    return 1 if failed else 0


sys.exit(main(sys.argv[1:]))
