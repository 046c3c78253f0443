"""The API contract, enforced: schemathesis against the real web process (gunicorn, real Redis, no worker).

    .venv/bin/python -m bench.contract [--examples 200] [--seed N] [--max-time 600]

`make bench` runs this long run; `tests/test_openapi.py` runs a short, seeded one (`run_schemathesis` with
few examples). Schemathesis reads GET /openapi.json and sends generated requests, valid and invalid
(`--mode all`), to every operation, the form-encoded robot and events endpoints included, with its default
checks: no 5xx, status codes documented, responses and content types as the document says, schema-valid
data accepted and invalid data refused. It gets an admin API key, the robot's key and the metrics token;
bench/schemathesis_hooks.py fills the events endpoint's form credential. A failure is a bug in the document
or in the service: fix whichever is wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import devenv

API_KEY = "contract-admin-key"
ROBOT_KEY = "contract-robot-key"
APP_TOKEN = "contract-app-token"
MEMBER_ID = "contract-member"
METRICS_TOKEN = "contract-metrics-token"
PORTAL = "shop"
# Statuses that a schema-valid request may get for reasons no schema can state: the key was used with
# another body (422, after an earlier case), a chat or portal this caller may not name (400/404).
ACCEPTABLE = ["2xx", "401", "403", "404", "409", "422"]


def portals_toml(webhook: str) -> str:
    return textwrap.dedent(f"""
        [portals.{PORTAL}]
        webhook_url = "{webhook}"
        application_token = "{APP_TOKEN}"
        member_id = "{MEMBER_ID}"
        chat = "chat1"
        chats = ["chat7"]
        robot_secret = "{ROBOT_KEY}"

        [[portals.{PORTAL}.rules]]
        event = "ONCRMDEALUPDATE"
        read = "crm.item.get"
        params = {{ entityTypeId = 2 }}
        documents_field = "ufCrm_InventoryDocs"
    """)


def config_toml() -> str:
    return textwrap.dedent(f"""
        [auth.openapi.bearerAuth]
        bearer = "{API_KEY}"
        [auth.openapi.robotKey]
        api_key = "{ROBOT_KEY}"
        [auth.openapi.metricsToken]
        bearer = "{METRICS_TOKEN}"
        [checks.positive_data_acceptance]
        expected-statuses = {ACCEPTABLE!r}

        # The robot needs document_ids or document_numbers: one of two query parameters, which OpenAPI's
        # parameters cannot state, so a call with neither is schema-valid and refused (400). Every other
        # check runs on it, invalid data refused included.
        [[operations]]
        include-path = "/v1/bitrix24/robot"
        checks.positive_data_acceptance.enabled = false
    """).replace("'", '"')


@contextlib.contextmanager
def web_stack(tmp: Path, redis_url: str | None = None) -> Iterator[str]:
    """gunicorn -c gunicorn.conf.py app:app on a free port (and a private Redis unless given); its base URL."""
    started: list[devenv.Process] = []
    try:
        if redis_url is None:
            redis_proc = devenv.start_redis(tmp / "redis")
            started.append(redis_proc)
            redis_url = redis_proc.url
        portals = tmp / "portals.toml"
        # The portal's URL is never called: no worker runs, and the intake calls nothing.
        portals.write_text(portals_toml("http://127.0.0.1:9/rest/1/contractwebhook/"))
        port = devenv.free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("B24_", "TRIGGER_", "SENTRY_", "SANDBOX_",
                                                                        "METRICS_", "REDIS_", "GUNICORN_"))}
        env.update(HOST="127.0.0.1", PORT=str(port), REDIS_URL=redis_url, B24_PORTALS_FILE=str(portals),
                   TRIGGER_API_KEYS=API_KEY, METRICS_TOKEN=METRICS_TOKEN, WEB_CONCURRENCY="1",
                   PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
        web = devenv.start_web(env, log=tmp / "web.log")
        started.append(web)
        yield web.url
    finally:
        for proc in reversed(started):
            proc.stop()


def run_schemathesis(base_url: str, tmp: Path, examples: int, seed: int, max_time: int | None = None,
                     extra: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """One schemathesis run against the web process at base_url; its exit code and output."""
    config = tmp / "schemathesis.toml"
    config.write_text(config_toml())
    argv = [str(Path(sys.executable).parent / "st"), "--no-color", "--config-file", str(config), "run",
            f"{base_url}/openapi.json", "--mode", "all", "--seed", str(seed), "--max-examples", str(examples),
            "--generation-deterministic", "--report-dir", str(tmp / "reports"), *(extra or [])]
    if max_time:
        argv += ["--max-time", str(max_time)]
    env = dict(os.environ, SCHEMATHESIS_HOOKS="bench.schemathesis_hooks", CONTRACT_APP_TOKEN=APP_TOKEN,
               CONTRACT_MEMBER_ID=MEMBER_ID, CONTRACT_PORTAL=PORTAL, CONTRACT_CHAT="chat7", PYTHONPATH=str(ROOT))
    return subprocess.run(argv, cwd=tmp, env=env, capture_output=True, text=True, check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.contract")
    parser.add_argument("--examples", type=int, default=200, help="examples per operation and phase (200)")
    parser.add_argument("--seed", type=int, default=20261202)
    parser.add_argument("--max-time", type=int, default=900, help="time budget in seconds (900)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="b24-contract-") as tmpdir:
        tmp = Path(tmpdir)
        with web_stack(tmp) as url:
            result = run_schemathesis(url, tmp, args.examples, args.seed, args.max_time)
    print(result.stdout[-20000:])
    print(result.stderr[-2000:], file=sys.stderr)
    print(f"schemathesis: exit {result.returncode} ({'passed' if result.returncode == 0 else 'FAILED'}), "
          f"{args.examples} examples, seed {args.seed}")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
