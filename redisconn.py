"""One Redis connection from REDIS_URL, for the web, the workers, RQ and the limiter alike.

`REDIS_URL` is a plain URL (`redis://`, `rediss://`, `unix://`) or a Sentinel URL:

    redis+sentinel://[[user]:password@]host:26379[,host2:26379...]/<service>[/<db>][?sentinel_password=...]
    rediss+sentinel://...   (TLS to the primary)

With Sentinel the connection is redis-py's `Sentinel(...).master_for(service)`: every new socket asks the
sentinels where the primary is, and a socket that finds a demoted primary (READONLY) or a dead one is
dropped, so the next command reaches the new primary. Commands are never resent by the client on a
connection error (redis-py's default for pools): a write that may have run is not run twice behind our
back; the caller sees the error (the intake answers 503, a job is retried) and the next command follows
the failover. The user name and password in the URL are the primary's (and replicas'); sentinels that
require their own password get it from `sentinel_password`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from redis.sentinel import Sentinel

PLAIN_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
# Sentinel's own default port, used when a sentinel host is given without one.
SENTINEL_PORT = 26379
SENTINEL_EXAMPLE = "redis+sentinel://host:26379,host2:26379/mymaster/0"
# Asking a sentinel where the primary is must fail fast (the next sentinel is asked), not hang a request.
SENTINEL_SOCKET_TIMEOUT = 1.0


@dataclass(frozen=True)
class SentinelTarget:
    """A parsed Sentinel URL: where the sentinels are, which service, which db and the credentials."""

    sentinels: list[tuple[str, int]]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)
    ssl: bool = False


def is_sentinel_url(url: str) -> bool:
    """Whether REDIS_URL names Sentinels rather than one server."""
    return url.strip().lower().startswith(tuple(f"{scheme}://" for scheme in SENTINEL_SCHEMES))


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Parse a Sentinel URL; raise ValueError saying what is wrong (never echoing a password)."""
    parts = urlsplit(url.strip())
    if parts.scheme.lower() not in SENTINEL_SCHEMES:
        raise ValueError(f"a Sentinel URL starts with redis+sentinel:// (like {SENTINEL_EXAMPLE})")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    if not hosts:
        raise ValueError(f"names no sentinel host (like {SENTINEL_EXAMPLE})")
    sentinels: list[tuple[str, int]] = []
    for item in (part.strip() for part in hosts.split(",")):
        if item.startswith("["):  # an IPv6 address: [::1]:26379
            host, _, rest = item[1:].partition("]")
            port = rest.removeprefix(":")
        else:
            host, _, port = item.partition(":")
        if not host:
            raise ValueError(f"has an empty sentinel host in {hosts!r} (like {SENTINEL_EXAMPLE})")
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"has a bad sentinel port {port!r}: ports are 1-65535")
        sentinels.append((host, int(port) if port else SENTINEL_PORT))
    path = [segment for segment in parts.path.split("/") if segment]
    if not path:
        raise ValueError(f"names no service after the hosts: /<service>[/<db>] (like {SENTINEL_EXAMPLE})")
    if len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError(f"has a path other than /<service>[/<db>] with a numeric db (like {SENTINEL_EXAMPLE})")
    username, password = None, None
    if userinfo:
        name, has_password, secret = userinfo.partition(":")
        username = unquote(name) or None
        password = unquote(secret) if has_password else None
    query = parse_qs(parts.query)
    unknown = sorted(set(query) - {"sentinel_password"})
    if unknown:
        raise ValueError(f"has an unknown option {unknown[0]!r} (only sentinel_password is understood)")
    sentinel_password = query["sentinel_password"][-1] if "sentinel_password" in query else None
    return SentinelTarget(sentinels=sentinels, service=unquote(path[0]), db=int(path[1]) if len(path) == 2 else 0,
                          username=username, password=password, sentinel_password=sentinel_password,
                          ssl=parts.scheme.lower() == "rediss+sentinel")


def check_url(url: str) -> str:
    """Validate REDIS_URL (plain or Sentinel); raise ValueError with a message a person can act on."""
    text = url.strip()
    scheme = urlsplit(text).scheme.lower()
    if scheme in SENTINEL_SCHEMES:
        parse_sentinel_url(text)
    elif scheme not in PLAIN_SCHEMES:
        raise ValueError("must be redis://host:port/db, rediss://..., unix:///path/to/socket, or a Sentinel URL "
                         f"like {SENTINEL_EXAMPLE}")
    return text


def rq_sentinel_config(target: SentinelTarget, **connection_kwargs: Any) -> dict[str, Any]:
    """The `SENTINEL` dict RQ's worker reads from its config module (rq.cli.helpers.get_redis_from_config)."""
    return {
        "INSTANCES": target.sentinels,
        "MASTER_NAME": target.service,
        "DB": target.db,
        "USERNAME": target.username,
        "PASSWORD": target.password,
        "SSL": target.ssl,
        "SENTINEL_KWARGS": _sentinel_kwargs(target),
        "CONNECTION_KWARGS": connection_kwargs,
    }


def _sentinel_kwargs(target: SentinelTarget) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"socket_timeout": SENTINEL_SOCKET_TIMEOUT,
                              "socket_connect_timeout": SENTINEL_SOCKET_TIMEOUT}
    if target.sentinel_password:
        kwargs["password"] = target.sentinel_password
    return kwargs


def connect(url: str, **kwargs: Any) -> redis.Redis:
    """A Redis client for REDIS_URL; `kwargs` (timeouts, health checks) apply to the primary's sockets.

    For a Sentinel URL this builds what RQ's worker builds from `rq_sentinel_config`, so web and workers
    find the primary the same way.
    """
    if not is_sentinel_url(url):
        return redis.Redis.from_url(url, **kwargs)
    target = parse_sentinel_url(url)
    config = rq_sentinel_config(target, **kwargs)
    sentinel = Sentinel(config["INSTANCES"], sentinel_kwargs=config["SENTINEL_KWARGS"], db=config["DB"],
                        username=config["USERNAME"], password=config["PASSWORD"], ssl=config["SSL"],
                        **config["CONNECTION_KWARGS"])
    return sentinel.master_for(target.service)


def describe(url: str) -> str:
    """REDIS_URL without its password, for logs and start-up lines."""
    parts = urlsplit(url.strip())
    if "@" not in parts.netloc:
        return url.strip()
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    shown = f"{user}:****@" if ":" in userinfo else f"{user}@"
    return parts._replace(netloc=shown + hosts, query="").geturl()
