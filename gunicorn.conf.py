"""gunicorn settings for the web process (see README, "Performance" and "Running in production", for why)."""

import multiprocessing
import os

# HOST defaults to all interfaces for a server; `make run` sets 127.0.0.1.
bind = [f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '8000')}"]
# METRICS_BIND (e.g. 127.0.0.1:9100): a second listener of the same workers that serves /metrics only
# and needs no token (transport.BodyLimit keeps every other path off it); keep it off the public network.
if os.environ.get("METRICS_BIND"):
    bind.append(os.environ["METRICS_BIND"])
# The intake is CPU-bound Python plus one Redis round trip: one worker process per core, plus one to
# cover the moments a worker waits on Redis.
workers = int(os.environ.get("WEB_CONCURRENCY", multiprocessing.cpu_count() + 1))
# Threads, not sync: a sync worker is held by one connection until it has sent its whole request, so a
# few clients that drip header bytes (slow loris) took every worker and events were lost (issue 9).
# transport.IntakeWorker is gunicorn's gthread worker that also cuts off any connection holding a thread
# longer than REQUEST_READ_DEADLINE (10 s), bounds the request line itself and answers gunicorn's own
# errors as JSON. Threads wait on sockets and Redis, not on the CPU: 32 per process means 96 connections
# at once on 3 workers before anyone waits (bench.slowloris measures 50 dripping clients).
worker_class = "transport.IntakeWorker"
threads = int(os.environ.get("WEB_THREADS", "32"))
# A worker takes no more connections than it has threads: a worker whose threads are all held stops
# accepting, and the others take the new connections instead of queueing them behind the held ones.
worker_connections = threads
# No kept-alive connections (worker_connections = threads leaves no room for them): each answer closes
# its connection, as the sync worker did; Bitrix24 and webhook senders open one per delivery anyway.
keepalive = 0
# The request line is bounded by transport.MAX_REQUEST_LINE (16 KiB, above gunicorn's 8190 maximum):
# 0 takes gunicorn's own limit, and its HTML 414, out of the way.
limit_request_line = 0
# No client may set the WSGI SCRIPT_NAME or PATH_INFO through a header: the service is mounted at the
# root, and gunicorn's default lets loopback peers do it (a SCRIPT_NAME header gave a 500 on any path).
forwarder_headers = ""
# Who may say the original request was https (X-Forwarded-Proto): the reverse proxy in front only,
# by default one on this machine. Nothing else is taken from forwarding headers (REMOTE_ADDR stays the peer).
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1,::1")
# A request never takes long: no Bitrix24 call happens in the web process.
timeout = 30
graceful_timeout = 20
# Build the app once in the master, so workers fork with settings and modules loaded.
preload_app = True
accesslog = None
errorlog = "-"
