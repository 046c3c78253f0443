"""`rq worker -c jobs.worker_config`: settings, Sentry and logging, and the job modules preloaded.

Importing the job code here, in the worker parent, means each forked work-horse starts with it
loaded instead of importing httpx, pydantic and our modules again for every job.
"""

from __future__ import annotations

import logging
import sys

import observability
import redisconn
from settings import SettingsError, load_settings

try:
    _settings = load_settings()
except SettingsError as exc:
    print(exc, file=sys.stderr)
    raise SystemExit(2) from None

if not _settings.redis_url:
    print("invalid configuration:\n  REDIS_URL: required by the worker (make run sets it for you)", file=sys.stderr)
    raise SystemExit(2)

observability.init(_settings, component="worker")

import jobs.app
import jobs.cancel
import jobs.notify
import jobs.resolve  # noqa: F401
from jobs.context import worker_context

worker_context(_settings)
for _portal in _settings.portals.values():
    logging.getLogger("b24cancel.worker").info("portal", extra={"portal": _portal.name, "url": _portal.masked_url,
                                                                "chat": _portal.chat, "rules": len(_portal.rules)})

# RQ reads REDIS_URL, or a SENTINEL dict (rq.cli.helpers.get_redis_from_config) for a Sentinel URL: then the
# worker, its work-horses and its scheduler find the primary through the sentinels, as the web does.
if redisconn.is_sentinel_url(_settings.redis_url):
    SENTINEL = redisconn.rq_sentinel_config(redisconn.parse_sentinel_url(_settings.redis_url))
else:
    REDIS_URL = _settings.redis_url
