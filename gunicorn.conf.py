"""gunicorn settings for the web process (see README, "Performance", for why these values)."""

import multiprocessing
import os

# HOST defaults to all interfaces for a server; `make run` sets 127.0.0.1.
bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '8000')}"
# The intake is CPU-bound Python plus one Redis round trip: one sync worker per core, plus one to
# cover the moments a worker waits on Redis (2, 3 and 4 workers measured alike on 2 cores).
workers = int(os.environ.get("WEB_CONCURRENCY", multiprocessing.cpu_count() + 1))
worker_class = "sync"
# The sync worker answers one request per connection and closes it (gunicorn's sync worker ignores
# keep-alive); gthread, which keeps connections, measured a worse p99 here (README, "Performance").
# A request never takes long: no Bitrix24 call happens in the web process.
timeout = 30
graceful_timeout = 20
# Build the app once in the master, so workers fork with settings and modules loaded.
preload_app = True
accesslog = None
errorlog = "-"
