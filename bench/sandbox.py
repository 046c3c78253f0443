"""Benchmark: how many cheap REST calls per second the sandbox portal answers.

Starts its own sandbox on a free loopback port (limits raised so they never interfere), drives
`catalog.document.mode.status` from several threads over keep-alive connections for a few seconds,
checks the sandbox counted the same calls, and prints calls/s as the last line.

    .venv/bin/python bench/sandbox.py [--seconds 5] [--threads 8] [--max-calls 100000]
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import devenv

HOST = "127.0.0.1"  # the benchmark only ever talks to this machine
# Limits far above what the benchmark can reach, so only the server's speed is measured.
UNLIMITED = ["--rate", "1000000", "--burst", "1000000"]
WARM_UP_CALLS = 200


def drive(port: int, path: str, deadline: float, budget: list[int], lock: threading.Lock,
          counts: list[int], errors: list[int], slot: int) -> None:
    """Send calls on one keep-alive connection until the deadline or the shared call budget runs out."""
    connection = http.client.HTTPConnection(HOST, port, timeout=10)
    body = b"{}"
    headers = {"Content-Type": "application/json"}
    try:
        while time.monotonic() < deadline:
            with lock:
                if budget[0] <= 0:
                    return
                budget[0] -= 1
            connection.request("POST", path, body=body, headers=headers)
            answer = connection.getresponse()
            payload = answer.read()
            if answer.status == 200 and json.loads(payload)["result"] == "Y":
                counts[slot] += 1
            else:
                errors[slot] += 1
    finally:
        connection.close()


def run(seconds: float, threads: int, max_calls: int, method: str) -> float:
    """Run the benchmark against a fresh sandbox and return calls per second."""
    proc = devenv.start_sandbox(args=["--documents", "20", "--durations-zero", *UNLIMITED])
    try:
        port = int(proc.url.rsplit(":", 1)[1])
        path = f"/rest/1/sandbox/{method}"
        warm = http.client.HTTPConnection(HOST, port, timeout=10)
        for _ in range(WARM_UP_CALLS):
            warm.request("POST", path, body=b"{}", headers={"Content-Type": "application/json"})
            warm.getresponse().read()
        warm.request("POST", "/_sandbox/reset", body=b"{}")
        warm.getresponse().read()
        warm.close()

        counts, errors = [0] * threads, [0] * threads
        budget, lock = [max_calls], threading.Lock()
        started = time.monotonic()
        deadline = started + seconds
        workers = [threading.Thread(target=drive,
                                    args=(port, path, deadline, budget, lock, counts, errors, i))
                   for i in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        elapsed = time.monotonic() - started

        check = http.client.HTTPConnection(HOST, port, timeout=10)
        check.request("GET", "/_sandbox/stats")
        served = json.loads(check.getresponse().read())["requests"]
        check.close()
        done = sum(counts)
        print(f"method {method}, {threads} threads, {elapsed:.2f} s: {done} ok, {sum(errors)} failed, "
              f"sandbox counted {served}")
        return done / elapsed
    finally:
        proc.stop()


def main() -> None:
    """Parse arguments, run, print the figure."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--max-calls", type=int, default=100_000)
    parser.add_argument("--method", default="catalog.document.mode.status")
    args = parser.parse_args()
    rate = run(min(args.seconds, 60.0), max(1, args.threads), max(1, args.max_calls), args.method)
    print(f"sandbox: {rate:.0f} calls/s")


if __name__ == "__main__":
    main()
