"""What a job needs besides its arguments: settings, the Redis connection and a client per portal.

Built once per worker process (the config module preloads it in the worker parent); the HTTP
client has no open connections at fork time, so each work-horse opens its own.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field

import httpx
import redis
from rq import get_current_job

from bitrix24.auth import OAuthTokens
from bitrix24.client import Bitrix24Client
from bitrix24.gate import PortalGate
from jobs import policy
from jobs.lifecycle import check_current_lease
from jobs.metrics import Tally
from registry import Registry
from settings import Portal, Settings, load_settings


@dataclass
class WorkerContext:
    """Settings and the per-process resources derived from them.

    The TLS context (CA bundle loaded: about 30 ms of CPU) is built once in the worker parent and shared
    by every forked work-horse; each horse opens its own connections with it.
    """

    settings: Settings
    tls: ssl.SSLContext = field(default_factory=httpx.create_ssl_context)
    tally: Tally = field(default_factory=Tally)
    pid: int = field(default_factory=os.getpid)
    _http: httpx.Client | None = None

    @property
    def http(self) -> httpx.Client:
        if self._http is None:
            timeout = httpx.Timeout(self.settings.b24_read_timeout, connect=self.settings.b24_connect_timeout)
            self._http = httpx.Client(timeout=timeout, follow_redirects=False, verify=self.tls)
        return self._http

    def portal(self, name: str, conn: redis.Redis) -> Portal | None:
        """The portal by name: configured, or installed through the app (read from Redis each time)."""
        return Registry(self.settings, conn).portal(name)

    def portal_gone_reason(self, name: str, conn: redis.Redis) -> str:
        """Why a request's portal is not there: the app was uninstalled, or it is no longer configured."""
        from registry import UNINSTALLED

        return UNINSTALLED if Registry(self.settings, conn).gone(name) else "portal not configured"

    def client(self, portal: Portal, conn: redis.Redis) -> Bitrix24Client:
        """A client for the portal, passing through the limits shared with every other worker."""
        gate = PortalGate.for_portal(conn, portal, self.settings, max_sleep=policy.MAX_SLEEP,
                                     observe=self.tally.observe)
        tokens = OAuthTokens(conn, portal.name, portal.oauth, self.http) if portal.oauth else None
        return Bitrix24Client(portal.base_url, portal.name, self.http, gate, observe=self.tally.observe,
                              tokens=tokens, before_send=check_current_lease)


_context: WorkerContext | None = None


def worker_context(settings: Settings | None = None) -> WorkerContext:
    """This process's context, built on first use (and again after a fork, for a fresh HTTP pool)."""
    global _context
    if _context is None:
        _context = WorkerContext(settings=settings or load_settings())
    elif _context.pid != os.getpid():
        _context = WorkerContext(settings=_context.settings, tls=_context.tls)
    return _context


def job_connection() -> redis.Redis:
    """The Redis connection of the job being run."""
    job = get_current_job()
    if job is None:
        raise RuntimeError("not inside an RQ job")
    return job.connection
