"""The NAIVE way to do what the service does, for `bench.limits` to compare with: no limiter at all.

A thread pool of 4; for each request, straight to the portal over HTTP: the same `batch` our cancel job
sends (read, `catalog.document.cancel`, read: one HTTP request), then `im.message.add` (one HTTP
request). Any 503 (QUERY_LIMIT_EXCEEDED) is answered by sleeping 1 s and sending the same call again.
No Redis, no RQ, no shared state between the threads.

    .venv/bin/python -m bench.naive_client [--requests 60] [--rate 2] [--burst 50]

run on its own it starts a sandbox with those limits on a free loopback port and prints its figures last.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from bench.common import CHAT, Sandbox, Stack, message_times, top_level

RETRY_SLEEP = 1.0
THREADS = 4
MAX_ATTEMPTS = 1000  # per call; only a broken sandbox gets near it


class NaiveClient:
    """Cancel and report, retrying 503s after a fixed second."""

    def __init__(self, webhook: str, threads: int = THREADS) -> None:
        self.webhook = webhook if webhook.endswith("/") else webhook + "/"
        self.threads = threads
        self.local = threading.local()
        self.lock = threading.Lock()
        self.retries = 0  # 503 answers seen
        self.failures: list[str] = []

    def http(self) -> httpx.Client:
        client = getattr(self.local, "client", None)
        if client is None:
            client = self.local.client = httpx.Client(timeout=30)
        return client

    def call(self, method: str, params: dict[str, Any]) -> Any:
        for _ in range(MAX_ATTEMPTS):
            answer = self.http().post(f"{self.webhook}{method}.json", json=params)
            if answer.status_code == 503:
                with self.lock:
                    self.retries += 1
                time.sleep(RETRY_SLEEP)
                continue
            body = answer.json()
            if answer.status_code != 200 or "error" in body:
                raise RuntimeError(f"{method}: HTTP {answer.status_code} {body}")
            return body["result"]
        raise RuntimeError(f"{method}: still 503 after {MAX_ATTEMPTS} attempts")

    def one(self, doc_id: int, tag: str) -> None:
        read = f"catalog.document.list?select[0]=id&select[1]=status&select[2]=title&filter[@id][0]={doc_id}&start=-1"
        try:
            result = self.call("batch", {"halt": 0, "cmd": {"before": read, "d": f"catalog.document.cancel?id={doc_id}",
                                                            "after": read}})
            cancelled = (result.get("result") or {}).get("d") is True
            text = (f"[b]Inventory documents un-conducted[/b]\n• #{doc_id}: "
                    f"{'cancelled' if cancelled else 'not cancelled'}\n\nRequest {tag}")
            self.call("im.message.add", {"DIALOG_ID": CHAT, "MESSAGE": text, "URL_PREVIEW": "N"})
        except Exception as exc:  # noqa: BLE001 - counted and reported
            with self.lock:
                self.failures.append(f"{doc_id}: {exc}")

    def run(self, doc_ids: list[int], tag_prefix: str = "#naive-") -> float:
        """Run every request through the pool; return the wall time from start to the last answer."""
        started = time.time()
        with ThreadPoolExecutor(self.threads) as pool:
            list(pool.map(lambda d: self.one(d, f"{tag_prefix}{d}"), doc_ids))
        return time.time() - started


def naive_posts(calls: list[dict[str, Any]], tag_prefix: str = "#naive-") -> dict[str, float]:
    def tag(text: str) -> str | None:
        at = text.find(tag_prefix)
        return text[at:].split()[0] if at >= 0 else None

    return message_times(calls, tag)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--rate", default="2")
    parser.add_argument("--burst", default="50")
    args = parser.parse_args(argv)
    n = max(1, min(args.requests, 1000))
    stack = Stack("naive")
    try:
        proc = stack.sandbox("--documents", str(n), "--rate", args.rate, "--burst", args.burst)
        client = NaiveClient(proc.extra["webhook"])
        started = time.time()
        client.run(list(range(1, n + 1)))
        sandbox = Sandbox(proc.url)
        calls = sandbox.calls()
        posted = naive_posts(calls)
        stats = sandbox.stats()
    finally:
        stack.close()
    total = max(posted.values()) - started if posted else float("nan")
    needed = sum(1 for c in top_level(calls) if c.get("http_status") != 503)
    bound = max(0.0, (needed - float(args.burst)) / float(args.rate))
    print(f"naive: {n} requests, {len(posted)} reports posted, failures {len(client.failures)}")
    print(f"naive: {needed} calls needed, bound {bound:.1f} s, total {total:.1f} s, ratio {total / bound if bound else 0:.2f}, "
          f"503s {stats['by_status'].get('503', 0)} (client retries {client.retries})")
    return 0 if not client.failures and len(posted) == n else 1


if __name__ == "__main__":
    sys.exit(main())
