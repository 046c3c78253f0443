"""CPU instructions per `POST /v1/cancel`, counted by valgrind (callgrind): ours against a bare Flask route.

    .venv/bin/python -m bench.instructions [--requests 500]

wrk's req/s moves with whatever else the machine runs; an instruction count does not (the same binary and
inputs give the same count, whatever the other cores do). Each app is run twice under callgrind in a child
Python, with 0 and with `--requests` POSTs through Flask's test client (after the same warm-up), against a
private Redis; the difference divided by the requests is the cost of one request in this process: Flask,
our handler, pydantic, redis-py. Redis's own work and the kernel's are not counted (bench.intake's CPU
figures show those). Prints instructions per request for each app and the ratio bare/ours, the in-process
counterpart of bench.intake's ours/bare req/s ratio. About 2 minutes per app (valgrind runs ~50x slower).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import devenv

CHILD = r"""
import sys
sys.path.insert(0, sys.argv[3])
n, which = int(sys.argv[1]), sys.argv[2]
from flask import Flask
BODY = b'{"document_ids": [142, 143], "reason": "bench"}'
HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer bench-key"}
if which == "ours":
    import app as module
    app = module.create_app()
else:
    app = Flask("bare")
    app.post("/v1/cancel")(lambda: ({"request_id": "0" * 32, "status_url": "/v1/requests/" + "0" * 32}, 202))
client = app.test_client()
for i in range(20):
    client.post("/v1/cancel", data=BODY, headers={**HEADERS, "Idempotency-Key": f"warm-{which}-{n}-{i}"})
for i in range(n):
    answer = client.post("/v1/cancel", data=BODY, headers={**HEADERS, "Idempotency-Key": f"{which}-{n}-{i}"})
    assert answer.status_code == 202, answer.get_data()
"""


def count(which: str, requests: int, env: dict[str, str], tmp: Path) -> int:
    """Instructions callgrind counted for one child run."""
    script = tmp / "child.py"
    script.write_text(CHILD)
    out = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/callgrind.%p",
                          sys.executable, str(script), str(requests), which, str(ROOT)],
                         env=env, capture_output=True, text=True, check=True)
    found = re.search(r"Collected : (\d+)", out.stderr)
    if not found:
        raise SystemExit(f"valgrind printed no count:\n{out.stderr[-2000:]}")
    return int(found.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions")
    parser.add_argument("--requests", type=int, default=500)
    args = parser.parse_args(argv)
    if not shutil.which("valgrind"):
        print("valgrind is not installed (Debian package valgrind)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="b24-instructions-") as tmpdir:
        tmp = Path(tmpdir)
        redis_proc = devenv.start_redis(tmp / "redis")
        try:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("B24_", "TRIGGER_", "SENTRY_",
                                                                            "SANDBOX_", "REDIS_"))}
            env.update(REDIS_URL=redis_proc.url, B24_WEBHOOK_URL="http://127.0.0.1:9/rest/1/benchcode/",
                       B24_CHAT_ID="chat1", TRIGGER_API_KEYS="bench-key")
            per_request = {}
            for which in ("bare", "ours"):
                base, loaded = count(which, 0, env, tmp), count(which, args.requests, env, tmp)
                per_request[which] = (loaded - base) / args.requests
                print(f"{which}: {per_request[which]:,.0f} instructions per POST /v1/cancel "
                      f"({args.requests} requests, test client)", flush=True)
        finally:
            redis_proc.stop()
    print(f"ratio bare/ours = {per_request['bare'] / per_request['ours']:.2f} (instructions in the web process; "
          "the in-process counterpart of bench.intake's ours/bare req/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
