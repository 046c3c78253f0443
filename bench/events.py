"""300 Bitrix24 events arriving at once: intake latency (p50/p99) and time until all are resolved.

Runs its own Redis, sandbox portal (limits opened up), gunicorn web and one worker, on free loopback
ports, and stops them by PID. The baseline, in the same run on the same server, is the same burst
against `/healthz` (a route that does nothing).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import devenv
from jobs import records

EVENTS = 300
CONNECTIONS = 32
TOKEN = "bench-app-token"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def burst(host: str, port: int, requests: list[bytes]) -> tuple[list[float], list[int]]:
    """Send raw HTTP requests from CONNECTIONS asyncio connections at once; latencies in ms and statuses.

    A raw asyncio client costs far less CPU than an HTTP library in threads, so on a 2-core machine the
    figures are the server's, not the load generator's. gunicorn's sync workers close every connection,
    so each request opens its own, as Bitrix24's queue does.
    """
    latencies: list[float] = [0.0] * len(requests)
    statuses: list[int] = [0] * len(requests)
    pending = iter(range(len(requests)))

    async def connection() -> None:
        for i in pending:
            started = time.perf_counter()
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(requests[i])
            await writer.drain()
            answer = await reader.read()
            writer.close()
            latencies[i] = (time.perf_counter() - started) * 1000
            statuses[i] = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0

    async def run() -> None:
        await asyncio.gather(*(connection() for _ in range(CONNECTIONS)))

    asyncio.run(run())
    return latencies, statuses


def raw_get(host: str, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()


def raw_post_form(host: str, path: str, form: dict[str, str]) -> bytes:
    body = urlencode(form).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
            f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def main() -> int:
    import redis

    work = Path(tempfile.mkdtemp(prefix="bench-events-"))
    started: list[devenv.Process] = []
    try:
        rds = devenv.start_redis(work / "redis")
        started.append(rds)
        sandbox = devenv.start_sandbox(args=["--documents", "10", "--durations-zero", "--rate", "100000",
                                             "--burst", "100000", "--application-token", TOKEN],
                                       log=work / "sandbox.log")
        started.append(sandbox)
        member_id = httpx.get(f"{sandbox.url}/_sandbox/config").json()["member_id"]
        portals = work / "portals.toml"
        portals.write_text(f"""
[portals.shop]
webhook_url = "{sandbox.extra['webhook']}"
application_token = "{TOKEN}"
member_id = "{member_id}"
chat = "chat1"

[[portals.shop.rules]]
event = "ONCRMDEALUPDATE"
read = "crm.item.get"
params = {{ entityTypeId = 2 }}
when = {{ stageId = "C1:LOSE" }}
documents_field = "ufCrm_InventoryDocs"
""")
        port = devenv.free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("B24_", "TRIGGER_", "SENTRY_"))}
        env.update({"REDIS_URL": rds.url, "B24_PORTALS_FILE": str(portals), "HOST": "127.0.0.1",
                    "PORT": str(port), "B24_RATE_LIMIT": "100000", "B24_RATE_BURST": "100000"})
        web = devenv.start_web(env, log=work / "web.log")
        started.append(web)
        worker = devenv.start_worker(env, log=work / "worker.log")
        started.append(worker)
        for n in range(EVENTS):
            httpx.post(f"{sandbox.url}/_sandbox/crm/items", json={
                "entityTypeId": 2, "id": 5000 + n, "fields": {"stageId": "C1:WON"}}).raise_for_status()
        payloads = [{"event": "ONCRMDEALUPDATE", "event_handler_id": "1", "data[FIELDS][ID]": str(5000 + n),
                     "ts": str(1766000000 + n), "auth[domain]": sandbox.url.split("//")[1],
                     "auth[member_id]": member_id, "auth[application_token]": TOKEN} for n in range(EVENTS)]
        host = f"127.0.0.1:{port}"
        burst("127.0.0.1", port, [raw_get(host, "/healthz")] * 100)  # warm-up
        base_ms, base_status = burst("127.0.0.1", port, [raw_get(host, "/healthz")] * EVENTS)
        t0 = time.perf_counter()
        ours_ms, ours_status = burst("127.0.0.1", port, [raw_post_form(host, "/v1/bitrix24/events", form)
                                                         for form in payloads])
        conn = redis.Redis.from_url(rds.url)
        ids = [key.decode().split(":")[-1] for key in conn.scan_iter("b24c:req:*", count=1000)]
        while any((records.load(conn, rid) or {}).get("state") != "done" for rid in ids):
            if time.perf_counter() - t0 > 300:
                print("gave up waiting for resolution after 300 s")
                return 1
            time.sleep(0.2)
        resolved_s = time.perf_counter() - t0
        ok = sum(200 <= s < 300 for s in ours_status)
        print(f"events: {EVENTS} at once from {CONNECTIONS} connections; gunicorn {os.cpu_count()} cores; "
              f"1 worker")
        print(f"baseline /healthz: p50 {statistics.median(base_ms):.1f} ms, p99 {percentile(base_ms, .99):.1f} ms, "
              f"{sum(200 <= s < 300 for s in base_status)}/{EVENTS} 2xx")
        print(f"events intake:     p50 {statistics.median(ours_ms):.1f} ms, p99 {percentile(ours_ms, .99):.1f} ms, "
              f"{ok}/{EVENTS} 2xx, {len(ids)} requests recorded")
        print(f"all {len(ids)} resolved {resolved_s:.1f} s after the burst started "
              f"({len(ids) / resolved_s:.1f} events/s with 1 worker)")
        print(f"p99 ratio events/healthz = {percentile(ours_ms, .99) / percentile(base_ms, .99):.2f} "
              f"(goal: p99 under 50 ms)")
        return 0 if ok == EVENTS and len(ids) == EVENTS else 1
    finally:
        for proc in reversed(started):
            proc.stop()


if __name__ == "__main__":
    sys.exit(main())
