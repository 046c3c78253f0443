"""300 Bitrix24 events arriving at once: intake latency (p50/p99) and time until all are resolved.

Runs its own Redis, sandbox portal (limits opened up), gunicorn web and one worker, on free loopback
ports, and stops them by PID. The baseline, in the same run on the same server, is the same burst
against `/healthz` (a route that does nothing).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import statistics
import subprocess
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


# wrk sends EVENTS requests in all, split over its threads, then stops (its Lua `response` hook). Each
# request carries a distinct object id and ts, so each is a new event.
WRK_THREADS = 2
WRK_SCRIPT = """
local threads = 0
function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end
sent, answered, bad = 0, 0, 0
request = function()
  sent = sent + 1
  if PATH == "/healthz" then return wrk.format("GET", PATH) end
  local n = 5000 + tid * %(per_thread)d + (sent - 1) %% %(per_thread)d
  local body = "event=ONCRMDEALUPDATE&event_handler_id=1&data%%5BFIELDS%%5D%%5BID%%5D=" .. n ..
    "&ts=" .. (1766000000 + n) .. "&auth%%5Bdomain%%5D=%(domain)s&auth%%5Bmember_id%%5D=%(member)s" ..
    "&auth%%5Bapplication_token%%5D=%(token)s"
  return wrk.format("POST", PATH, {["Content-Type"] = "application/x-www-form-urlencoded"}, body)
end
response = function(status, headers, body)
  answered = answered + 1
  if status < 200 or status > 299 then bad = bad + 1 end
  if answered >= %(per_thread)d then wrk.thread:stop() end
end
PATH = "%(path)s"
"""


def wrk_burst(url: str, path: str, work: Path, domain: str, member: str) -> tuple[float, float, str]:
    """EVENTS requests from CONNECTIONS wrk connections at once: p50 and p99 in ms, and wrk's own summary."""
    from bench.intake import to_ms

    script = work / f"burst{path.replace('/', '-')}.lua"
    script.write_text(WRK_SCRIPT % {"per_thread": EVENTS // WRK_THREADS, "path": path, "domain": domain,
                                    "member": member, "token": TOKEN})
    # The threads stop themselves after their share; -d only bounds the run (wrk then still waits it out,
    # and counts the connections its stopped threads left open as "timeout" socket errors).
    done = subprocess.run(["wrk", f"-t{WRK_THREADS}", f"-c{CONNECTIONS}", "-d5s", "--latency", "-s", str(script),
                           url], capture_output=True, text=True, timeout=60, check=False)
    p50 = re.search(r"^\s+50%\s+(\S+)", done.stdout, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+(\S+)", done.stdout, re.MULTILINE)
    if done.returncode != 0 or not (p50 and p99):
        raise RuntimeError(f"wrk failed: {done.stderr or done.stdout}")
    summary = " ".join(line.strip() for line in done.stdout.splitlines()
                       if "requests in" in line or "Non-2xx" in line or "Socket errors" in line)
    return to_ms(p50[1]), to_ms(p99[1]), summary


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
        domain = sandbox.url.split("//")[1]
        use_wrk = shutil.which("wrk") is not None
        if use_wrk:  # a C load generator: on 2 cores a Python client would take the server's CPU
            wrk_burst(f"{web.url}/healthz", "/healthz", work, domain, member_id)  # warm-up
            warm = [raw_post_form(host, "/v1/bitrix24/events", {**form, "event": "ONCRMCONTACTADD"})
                    for form in payloads[:60]]
            burst("127.0.0.1", port, warm)  # warm-up of the events path: no rule, so nothing is enqueued
            base50, base99, base_summary = wrk_burst(f"{web.url}/healthz", "/healthz", work, domain, member_id)
            ours50, ours99, ours_summary = wrk_burst(f"{web.url}/v1/bitrix24/events", "/v1/bitrix24/events",
                                                     work, domain, member_id)
            t0 = time.perf_counter()
        else:
            burst("127.0.0.1", port, [raw_get(host, "/healthz")] * 100)  # warm-up
            base_ms, base_status = burst("127.0.0.1", port, [raw_get(host, "/healthz")] * EVENTS)
            t0 = time.perf_counter()
            ours_ms, ours_status = burst("127.0.0.1", port, [raw_post_form(host, "/v1/bitrix24/events", form)
                                                             for form in payloads])
            base50, base99 = statistics.median(base_ms), percentile(base_ms, .99)
            ours50, ours99 = statistics.median(ours_ms), percentile(ours_ms, .99)
            base_summary = f"{sum(200 <= s < 300 for s in base_status)}/{EVENTS} 2xx"
            ours_summary = f"{sum(200 <= s < 300 for s in ours_status)}/{EVENTS} 2xx"
        conn = redis.Redis.from_url(rds.url)
        ids = [key.decode().split(":")[-1] for key in conn.scan_iter("b24c:req:*", count=1000)]
        while any((records.load(conn, rid) or {}).get("state") != "done" for rid in ids):
            if time.perf_counter() - t0 > 300:
                print("gave up waiting for resolution after 300 s")
                return 1
            time.sleep(0.2)
        resolved_s = time.perf_counter() - t0
        client = "wrk (C)" if use_wrk else "a raw asyncio client (wrk not installed)"
        print(f"events: {EVENTS} at once from {CONNECTIONS} connections ({client}); gunicorn on {os.cpu_count()} "
              f"cores; 1 worker resolving meanwhile")
        print(f"baseline /healthz: p50 {base50:.1f} ms, p99 {base99:.1f} ms; {base_summary}")
        print(f"events intake:     p50 {ours50:.1f} ms, p99 {ours99:.1f} ms; {ours_summary}; "
              f"{len(ids)} requests recorded")
        print(f"all {len(ids)} resolved {resolved_s:.1f} s after the burst{' ended' if use_wrk else ' started'} "
              f"({len(ids) / resolved_s:.1f} events/s with 1 worker)")
        print(f"p99 ratio events/healthz = {ours99 / base99:.2f} (goal: p99 under 50 ms)")
        refused = "Non-2xx" in ours_summary or (not use_wrk and "300/300" not in ours_summary)
        return 1 if refused or not ids else 0
    finally:
        for proc in reversed(started):
            proc.stop()


if __name__ == "__main__":
    sys.exit(main())
