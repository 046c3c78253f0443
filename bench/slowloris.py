"""Benchmark: Bitrix24 events answered while slow-loris clients drip header bytes at the web process.

One run, only on 127.0.0.1, about 25 s:

1. starts a private Redis and the web process as production runs it (`gunicorn -c gunicorn.conf.py app:app`,
   its worker class and threads; `GUNICORN_CMD_ARGS` is passed on, so `--worker-class sync` shows the
   finding of issue 9), with a portals file whose rule takes `ONCRMDEALUPDATE`;
2. opens `--drips` connections (50) that each send `POST /v1/bitrix24/events HTTP/1.1` and then one header
   byte about once a second, never finishing; a connection the server cuts off is opened again at once,
   so the attack keeps its strength for the whole run;
3. after `--settle` seconds, sends `--events` (100) valid events one after another, each on a new
   connection with a distinct object id, starting over `--spread` (15) seconds so that they meet the server
   cutting dripping connections off (REQUEST_READ_DEADLINE, 10 s) and the attacker opening new ones, and
   times each answer (5 s client timeout);
4. checks Redis: one request record per event answered 200 with a request id;
5. prints, as its last lines, the latency figures, how many answers took over 2 s, how often the server cut
   a dripping connection off, and whether the goal (every event within 2 s, p99 under 100 ms) is met.

    .venv/bin/python -m bench slowloris
    .venv/bin/python -m bench.slowloris [--drips 50] [--events 100] [--settle 3] [--spread 15] [--drip-interval 1]

Exit code: 0 when the goal is met and the Redis check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import devenv

HOST = "127.0.0.1"
TOKEN = "slowloris-app-token"
MEMBER_ID = "slowlorismember"
# The goal (issue 9; README, "Performance").
GOAL_MAX_S = 2.0
GOAL_P99_MS = 100.0
CLIENT_TIMEOUT = 5.0
PORTALS = textwrap.dedent(f"""
    [portals.shop]
    webhook_url = "https://shop.bitrix24.com/rest/1/benchcode/"
    application_token = "{TOKEN}"
    member_id = "{MEMBER_ID}"
    chat = "chat1"

    [[portals.shop.rules]]
    event = "ONCRMDEALUPDATE"
    read = "crm.item.get"
    params = {{ entityTypeId = 2 }}
    documents_field = "ufCrm_InventoryDocs"
""")


def event_body(object_id: int) -> bytes:
    """A valid outgoing event (form-encoded, PHP-style keys) for one deal."""
    return urlencode({"event": "ONCRMDEALUPDATE", "event_handler_id": "7", "data[FIELDS][ID]": str(object_id),
                      "ts": "1766047124", "auth[domain]": "shop.bitrix24.com", "auth[member_id]": MEMBER_ID,
                      "auth[application_token]": TOKEN}).encode()


class Drippers:
    """`count` connections that each send one more header byte every `interval` seconds and never finish."""

    def __init__(self, port: int, count: int, interval: float = 1.0) -> None:
        self.port, self.count, self.interval = port, count, interval
        self.opened = 0
        self.cut_off = 0  # connections the server closed on us (each is opened again)
        self.bytes_sent = 0
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def open(self) -> socket.socket:
        sock = socket.create_connection((HOST, self.port), timeout=5)
        sock.sendall(b"POST /v1/bitrix24/events HTTP/1.1\r\nHost: x\r\nX-Drip: ")
        sock.setblocking(False)
        self.opened += 1
        return sock

    def run(self) -> None:
        socks = [self.open() for _ in range(self.count)]
        sel = selectors.DefaultSelector()
        for sock in socks:
            sel.register(sock, selectors.EVENT_READ)
        while not self.stop_flag.wait(self.interval):
            # Whatever became readable was closed (or answered) by the server: replace it.
            for key, _ in sel.select(0):
                fileobj = key.fileobj
                assert isinstance(fileobj, socket.socket)
                sock = fileobj
                sel.unregister(sock)
                sock.close()
                socks.remove(sock)
                self.cut_off += 1
                fresh = self.open()
                socks.append(fresh)
                sel.register(fresh, selectors.EVENT_READ)
            for sock in list(socks):
                try:
                    sock.send(b"a")
                    self.bytes_sent += 1
                except OSError:
                    pass  # seen as readable (closed) on the next round
        for sock in socks:
            sock.close()
        sel.close()

    def __enter__(self) -> Drippers:  # noqa: PYI034 - a plain class, not meant to be subclassed
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_flag.set()
        self.thread.join(10)


@dataclass
class EventRun:
    latencies: list[float] = field(default_factory=list)  # seconds, one per event sent
    statuses: list[int] = field(default_factory=list)  # 0: no answer within the client timeout
    request_ids: list[str] = field(default_factory=list)

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


def post_event(port: int, object_id: int) -> tuple[int, str]:
    """One event over a new connection, as Bitrix24 sends it (HTTP/1.1, closed after the answer): status, request id."""
    body = event_body(object_id)
    head = (f"POST /v1/bitrix24/events HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n"
            f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection((HOST, port), timeout=CLIENT_TIMEOUT) as sock:
        sock.sendall(head + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    payload = json.loads(rest.partition(b"\r\n\r\n")[2] or b"{}")
    return int(status_line.split()[1]), str(payload.get("request_id", ""))


def send_events(port: int, count: int, first_id: int = 1, spread: float = 0.0) -> EventRun:
    """Send `count` events one after another, each on a new connection, timing each answer; they start
    `spread / count` seconds apart (so they meet the server cutting dripping connections off and the
    attacker opening them again)."""
    run = EventRun()
    begin = time.monotonic()
    for n in range(count):
        time.sleep(max(0.0, begin + n * spread / count - time.monotonic()))
        started = time.perf_counter()
        try:
            status, request_id = post_event(port, first_id + n)
        except (OSError, ValueError, IndexError):
            status, request_id = 0, ""
        run.latencies.append(time.perf_counter() - started)
        run.statuses.append(status)
        run.request_ids.append(request_id)
    return run


def web_env(redis_url: str, portals: Path, port: int, **extra: str) -> dict[str, str]:
    """The web process's environment: our Redis and portals file, nothing from the caller's B24_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("B24_", "TRIGGER_", "SENTRY_", "SANDBOX_",
                                                                    "REDIS_", "METRICS_"))}
    env.update(HOST=HOST, PORT=str(port), REDIS_URL=redis_url, B24_PORTALS_FILE=str(portals),
               PYTHONPATH=str(ROOT), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    env.update(extra)
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drips", type=int, default=50)
    parser.add_argument("--events", type=int, default=100)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds of dripping before the events")
    parser.add_argument("--drip-interval", type=float, default=1.0)
    parser.add_argument("--spread", type=float, default=15.0,
                        help="seconds over which the events start (longer than the server's REQUEST_READ_DEADLINE)")
    args = parser.parse_args()

    import redis

    with tempfile.TemporaryDirectory(prefix="b24-bench-slowloris-") as tmpdir:
        tmp = Path(tmpdir)
        portals = tmp / "portals.toml"
        portals.write_text(PORTALS)
        redis_proc = devenv.start_redis(tmp / "redis")
        web = None
        try:
            port = devenv.free_port()
            env = web_env(redis_proc.url, portals, port)
            web = devenv.start_web(env, log=tmp / "web.log")
            conn = redis.Redis.from_url(redis_proc.url)
            print(f"gunicorn -c gunicorn.conf.py app:app on {web.url} (pid {web.pid})"
                  + (f", GUNICORN_CMD_ARGS={env['GUNICORN_CMD_ARGS']!r}" if env.get("GUNICORN_CMD_ARGS") else ""),
                  flush=True)
            quiet = send_events(port, 20, first_id=1_000_000)  # warm-up, and the figures without attack
            conn.flushdb()
            with Drippers(port, args.drips, args.drip_interval) as drips:
                time.sleep(args.settle)
                started = time.monotonic()
                run = send_events(port, args.events, spread=args.spread)
                took = time.monotonic() - started
            records = sum(1 for _ in conn.scan_iter(match="b24c:req:*", count=1000))
            conn.close()
        finally:
            if web is not None:
                web.stop()
            redis_proc.stop()
    ok_ids = {rid for status, rid in zip(run.statuses, run.request_ids) if status == 200 and rid}
    slow = sum(1 for latency, status in zip(run.latencies, run.statuses) if latency > GOAL_MAX_S or status != 200)
    p50, p99, worst = run.percentile(50) * 1000, run.percentile(99) * 1000, max(run.latencies) * 1000
    met = slow == 0 and p99 < GOAL_P99_MS
    check = records == len(ok_ids) == args.events
    print(f"without attack: {len(quiet.latencies)} events, p50 {quiet.percentile(50) * 1000:.1f} ms, "
          f"p99 {quiet.percentile(99) * 1000:.1f} ms")
    print(f"drip connections: {args.drips} kept open ({drips.opened} opened, {drips.cut_off} cut off by the server "
          f"and opened again, {drips.bytes_sent} header bytes dripped)")
    print(f"check: {'PASSED' if check else 'FAILED'} ({records} request records for {len(ok_ids)} events answered "
          f"200 with a request id, of {args.events} sent)")
    print(f"events under attack: {args.events} sent one after another in {took:.1f} s; answered 200: "
          f"{run.statuses.count(200)}; no answer within {CLIENT_TIMEOUT:g} s: {run.statuses.count(0)}")
    print(f"latency under attack: p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {worst:.1f} ms; "
          f"over {GOAL_MAX_S:g} s or not 200: {slow}")
    print(f"goal (every event within {GOAL_MAX_S:g} s, p99 < {GOAL_P99_MS:g} ms, {args.drips} drip connections): "
          f"{'met' if met else 'NOT met'}")
    return 0 if met and check else 1


if __name__ == "__main__":
    sys.exit(main())
