"""Offline events over real processes: the sandbox's offline queue, gunicorn, rq workers (with the scheduler)
and our Redis.

Deals lose in the sandbox while the app's rule is bound offline; the tests assert on what really happened:
the documents' statuses, the chat reports, the sandbox's queue and calls, and the requests in Redis.
"""

from __future__ import annotations

import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from rq import Queue
from rq.serializers import JSONSerializer

import devenv
from jobs import offline
from jobs.records import KEY_PREFIX as REQUEST_PREFIX
from tests.helpers import SandboxView, bearer, wait_for
from tests.test_app import RULES as APP_RULES
from tests.test_app import Stack as AppStack

METRICS_TOKEN = "offline-metrics-token"
# test_app's app rule, delivered offline.
RULES = APP_RULES + 'delivery = "offline"\n'


class Stack(AppStack):
    """The service configured as the app with an offline rule: a web process and workers we stop and start."""

    def __init__(self, redis_url: str, tmp: Path, poll: int) -> None:
        super().__init__(redis_url, tmp, rules=RULES, extra_env={
            "METRICS_TOKEN": METRICS_TOKEN, "B24_OFFLINE_POLL": str(poll), "B24_RATE_LIMIT": "40",
            "B24_RATE_BURST": "400"})
        self.web_running = True

    def start_web(self) -> None:
        self.web = devenv.start_web(self.env, log=self.tmp / f"web-{self.port}.log")
        self.web_running = True

    def stop(self) -> None:
        """Everything down at once, as a crash or a deploy does."""
        for proc in self.workers:
            proc.kill_tree()
        self.workers = []
        if self.web_running:
            self.web.kill_tree()
            self.web_running = False


@pytest.fixture
def stack(redis_conn: redis.Redis, redis_url: str, tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    started: list[Stack] = []

    def start(workers: int = 1, poll: int = 2) -> Stack:
        made = Stack(redis_url, tmp_path, poll)
        started.append(made)
        for _ in range(workers):
            made.worker()
        return made

    yield start
    for made in started:
        made.stop()


def prepare(portal: SandboxView, documents: int = 20, reserve: bool = True) -> None:
    portal.http.post("/_sandbox/reset", json={"documents": documents}).raise_for_status()
    portal.http.post("/_sandbox/config", json={"rate": 100, "burst": 2000, "offline_reserve": reserve}
                     ).raise_for_status()


def install(portal: SandboxView, service: Stack) -> str:
    """Install the app and wait for its setup: the offline binding, ONOFFLINEEVENT and the robot."""
    portal.http.post("/_sandbox/app/install", json={"url": f"{service.url}/v1/bitrix24/app/install"}
                     ).raise_for_status()

    def bound() -> dict[str, Any]:
        state = portal.http.get("/_sandbox/app").json()
        events = {(b["event"], b["offline"]) for b in state["bindings"]}
        ready = state["robots"] and ("ONCRMDEALUPDATE", 1) in events and ("ONOFFLINEEVENT", 0) in events
        return state if ready else {}

    wait_for(bound, timeout=30, what="the offline binding and the robot")

    def done() -> bool:
        portals = service.http.get("/v1/portals").json()["portals"]
        return any(p.get("setup") == "done" for p in portals)

    wait_for(done, timeout=30, what="the portal's setup (bindings, robot, chat) to finish")
    return str(portal.http.get("/_sandbox/config").json()["member_id"])


def lost_while_down(portal: SandboxView, stack: Callable[..., Stack], first_deal: int,
                    documents: int) -> tuple[Stack, str, dict[int, int]]:
    """The app installed with one worker, the workers stopped, then deals first_deal+1.. lost (document n on
    deal first_deal+n): their records wait in the portal's offline queue. Returns the service, the member id
    and the deals with their documents."""
    prepare(portal)
    service = stack(workers=1)
    member_id = install(portal, service)
    for proc in service.workers:
        proc.kill_tree()
    service.workers = []
    deals = {first_deal + doc: doc for doc in range(1, documents + 1)}
    for deal, doc in deals.items():
        lose(portal, deal, doc)
    return service, member_id, deals


def queue_view(portal: SandboxView) -> dict[str, Any]:
    return portal.http.get("/_sandbox/offline").json()  # type: ignore[no-any-return]


def lose(portal: SandboxView, deal: int, doc: int) -> None:
    """A deal is created, then lost: its update is queued offline (the add is not bound)."""
    portal.http.post("/_sandbox/crm/items", json={"entityTypeId": 2, "id": deal, "fields": {
        "stageId": "C1:NEW", "ufCrm_InventoryDocs": [doc]}}).raise_for_status()
    portal.http.post("/_sandbox/crm/items", json={"entityTypeId": 2, "id": deal, "fields": {
        "stageId": "C1:LOSE", "ufCrm_InventoryDocs": [doc]}}).raise_for_status()


def requests_of(conn: redis.Redis) -> list[dict[str, Any]]:
    import json

    found = []
    for key in conn.scan_iter(f"{REQUEST_PREFIX}*", count=1000):
        raw = conn.hget(key, "request")
        if raw:
            found.append(json.loads(raw))
    return found


def reports_for(portal: SandboxView, deal: int) -> list[dict[str, Any]]:
    return [m for m in portal.messages() if f"Deal {deal} moved" in (m.get("message") or "")]


def all_cancelled(portal: SandboxView, docs: range | list[int], timeout: float) -> None:
    def done() -> bool:
        statuses = {d["id"]: d["status"] for d in portal.http.get("/_sandbox/documents").json()}
        return all(statuses[doc] != "Y" for doc in docs)

    wait_for(done, timeout=timeout, interval=0.5, what="every document to be cancelled")


def assert_once_each(portal: SandboxView, conn: redis.Redis, deals: dict[int, int], timeout: float = 60) -> None:
    """Each deal: its document cancelled by exactly one cancel call, one request, one chat report."""
    all_cancelled(portal, list(deals.values()), timeout)
    wait_for(lambda: all(reports_for(portal, deal) for deal in deals), timeout=timeout, interval=0.5,
             what="a report for every deal")
    time.sleep(1.5)  # room for a double to show
    by_deal: dict[int, int] = {}
    for request_ in requests_of(conn):
        if request_.get("delivery") == "offline":
            by_deal[request_["object_id"]] = by_deal.get(request_["object_id"], 0) + 1
    assert by_deal == {deal: 1 for deal in deals}, by_deal
    messages = portal.messages()
    for deal, doc in deals.items():
        assert portal.effective_cancels(doc) == 1, (deal, doc)
        assert len([m for m in messages if f"Deal {deal} moved" in (m.get("message") or "")]) == 1, deal


def queue_empty(portal: SandboxView, timeout: float = 30) -> dict[str, Any]:
    def empty() -> dict[str, Any]:
        view = queue_view(portal)
        return view if not view["records"] else {}

    return wait_for(empty, timeout=timeout, interval=0.5, what="the sandbox's offline queue to be empty")


# ---- the sandbox's offline queue --------------------------------------------------------------------------

def oauth(portal: SandboxView) -> Callable[..., httpx.Response]:
    token = portal.http.post("/_sandbox/oauth/tokens", json={}).json()["access_token"]

    def call(method: str, **params: Any) -> httpx.Response:
        return portal.http.post(f"/rest/{method}.json", json={**params, "auth": token})

    return call


def test_sandbox_offline_queue_methods_as_documented(sandbox: devenv.Process) -> None:
    portal = SandboxView(sandbox.url)
    portal.http.post("/_sandbox/app/install", json={"url": "http://127.0.0.1:9/none"})
    call = oauth(portal)
    # A webhook is refused; so is a user who is not an admin.
    hook = portal.http.post("/rest/1/sandbox/event.offline.get.json", json={}).json()
    assert hook["error"] == "ACCESS_DENIED" and "Application context" in hook["error_description"]
    portal.permissions(app_admin=False)
    refused = call("event.bind", event="ONCRMDEALUPDATE", event_type="offline")
    assert refused.status_code == 403 and refused.json()["error"] == "ACCESS_DENIED"
    assert call("event.offline.get").json()["error"] == "ACCESS_DENIED"
    portal.permissions(app_admin=True)
    assert call("event.bind", event="ONCRMDEALUPDATE", event_type="offline").json()["result"] is True
    again = call("event.bind", event="ONCRMDEALUPDATE", event_type="offline").json()
    assert again["error"] == "ERROR_HANDLER_ALREADY_EXIST"
    # One record per object, holding its latest state; a reserved record stays, a new change makes another.
    for deal in (1, 2, 3, 4):
        lose(portal, deal, deal)
    lose(portal, 2, 2)
    listed = call("event.offline.list").json()
    assert listed["total"] == 4 and [r["EVENT_DATA"]["FIELDS"]["ID"] for r in listed["result"]] == [1, 2, 3, 4]
    assert {r["PROCESS_ID"] for r in listed["result"]} == {""}
    # Parallel callers get disjoint batches; filter, order and limit apply.
    first = call("event.offline.get", clear=0, limit=2).json()["result"]
    second = call("event.offline.get", clear=0, limit=2, order={"ID": "DESC"}).json()["result"]
    ids_first = {r["ID"] for r in first["events"]}
    ids_second = {r["ID"] for r in second["events"]}
    assert len(ids_first) == 2 and len(ids_second) == 2 and not ids_first & ids_second
    assert first["process_id"] and first["process_id"] != second["process_id"]
    assert call("event.offline.get", clear=0).json()["result"]["events"] == []
    lose(portal, int(first["events"][0]["EVENT_DATA"]["FIELDS"]["ID"]), 1)  # changed while reserved
    view = queue_view(portal)
    assert len(view["records"]) == 5 and set(view["reserved"]) == {first["process_id"], second["process_id"]}
    # The same process_id returns its reserved records again (a pass that died), then new ones up to the limit.
    again_first = call("event.offline.get", clear=0, limit=3, process_id=first["process_id"]).json()["result"]
    assert {r["ID"] for r in again_first["events"]} >= ids_first
    # clear confirms only the named ids of that process_id; error marks failures, skipped unless asked.
    named = min(ids_first)
    assert call("event.offline.clear", process_id=first["process_id"], id=[named]).json()["result"] is True
    assert named not in {r["ID"] for r in queue_view(portal)["records"]}
    mid = second["events"][0]["MESSAGE_ID"]
    assert call("event.offline.error", process_id=second["process_id"], message_id=[mid]).json()["result"] is True
    assert call("event.offline.list", filter={"ERROR": 1}).json()["total"] == 1
    assert call("event.offline.clear").json()["error"] == "ERROR_ARGUMENT"
    # Without rest_offline_extended, clear=0 is refused and clear=1 deletes what it hands out.
    assert call("feature.get", CODE="rest_offline_extended").json()["result"] == {"value": "Y"}
    portal.http.post("/_sandbox/config", json={"offline_reserve": False}).raise_for_status()
    assert call("feature.get", CODE="rest_offline_extended").json()["result"] == {"value": "N"}
    assert call("event.offline.get", clear=0).json()["error"] == "ACCESS_DENIED"
    taken = call("event.offline.get", error=1).json()["result"]
    assert taken["process_id"] is None
    left = {r["ID"] for r in queue_view(portal)["records"]}
    assert not left & {r["ID"] for r in taken["events"]}
    assert call("feature.get").json()["error"] == "CODE_EMPTY"


def test_sandbox_parallel_offline_gets_receive_disjoint_batches(sandbox: devenv.Process) -> None:
    from concurrent.futures import ThreadPoolExecutor

    portal = SandboxView(sandbox.url)
    portal.http.post("/_sandbox/config", json={"rate": 100, "burst": 2000}).raise_for_status()
    portal.http.post("/_sandbox/app/install", json={"url": "http://127.0.0.1:9/none"})
    call = oauth(portal)
    assert call("event.bind", event="ONCRMDEALUPDATE", event_type="offline").json()["result"] is True
    for deal in range(1, 41):
        lose(portal, deal, 1)
    with ThreadPoolExecutor(8) as pool:
        batches = list(pool.map(lambda _: call("event.offline.get", clear=0, limit=5).json()["result"], range(8)))
    ids = [record["ID"] for batch in batches for record in batch["events"]]
    assert len(ids) == 40 and len(set(ids)) == 40
    assert len({batch["process_id"] for batch in batches}) == 8


# ---- the service -----------------------------------------------------------------------------------------

def test_records_queued_while_the_service_is_down_are_all_pulled_after_a_restart(
        sandbox: devenv.Process, stack: Callable[..., Stack], redis_conn: redis.Redis) -> None:
    portal = SandboxView(sandbox.url)
    prepare(portal, documents=210)
    service = stack(workers=1)
    install(portal, service)
    # 1. The web process and every worker stop.
    service.stop()
    # 2. 200 deals lose meanwhile: the portal queues them; its notices reach nobody.
    deals = {deal: deal for deal in range(1, 201)}
    for deal, doc in deals.items():
        lose(portal, deal, doc)
    assert len(queue_view(portal)["records"]) == 200
    assert all(portal.document(doc)["status"] == "Y" for doc in (1, 100, 200))
    time.sleep(2)  # past the notices' minTimeout: a deferred notice has gone out by now
    notices = queue_view(portal)["notices"]
    assert notices and all(n["status"] is None for n in notices), notices  # nobody was listening
    notices_before = len(notices)
    # 3. The service starts again; no notice is sent (nothing changes on the portal).
    service.start_web()
    service.worker()
    service.worker()
    # 4. Every deal's document ends up cancelled, with one request and one report each.
    assert_once_each(portal, redis_conn, deals, timeout=240)
    # 5. The queue is empty, and no notice was needed.
    queue_empty(portal)
    assert len(queue_view(portal)["notices"]) == notices_before
    portals = service.http.get("/v1/portals").json()["portals"]
    [shown] = [p for p in portals if p.get("offline")]
    assert shown["offline"]["pulled"] >= 200 and shown["offline"]["confirmed"] == shown["offline"]["pulled"]
    assert shown["offline"]["requests"] == 200 and shown["offline"]["last_pull_at"]
    health = service.http.get("/v1/health").json()
    assert health["offline_queues"][shown["name"]]["confirmed"] >= 200


def test_onofflineevent_wakes_a_pull(sandbox: devenv.Process, stack: Callable[..., Stack],
                                     redis_conn: redis.Redis) -> None:
    portal = SandboxView(sandbox.url)
    prepare(portal)
    service = stack(workers=1, poll=600)  # the schedule cannot be what pulls within the test
    member_id = install(portal, service)
    wait_for(lambda: redis_conn.hget(offline.state_key(member_id), "last_pull_at"), timeout=30,
             what="the first pull after the install")
    time.sleep(3)
    # A forged notice (wrong application token, or an unknown portal) is refused and enqueues nothing.
    state = portal.http.get("/_sandbox/app").json()
    form = {"event": "ONOFFLINEEVENT", "data[type]": "add", "data[event]": "ONCRMDEALUPDATE",
            "ts": str(int(time.time())), "auth[domain]": sandbox.url.split("//", 1)[1],
            "auth[member_id]": member_id, "auth[application_token]": "forged"}
    jobs_before = redis_conn.lrange("rq:queue:cancel", 0, -1)
    for forged in (form, {**form, "auth[member_id]": "0" * 32,
                          "auth[application_token]": state["application_token"]}):
        answer = httpx.post(f"{service.url}/v1/bitrix24/events", data=forged, timeout=10)
        assert answer.status_code == 401, answer.text
    assert redis_conn.lrange("rq:queue:cancel", 0, -1) == jobs_before
    assert not redis_conn.exists(offline.PENDING_KEY + member_id)
    lose(portal, 31, 7)
    assert_once_each(portal, redis_conn, {31: 7}, timeout=60)
    notices = queue_view(portal)["notices"]
    assert notices and notices[-1]["status"] == 200 and "pull" in notices[-1]["body"]
    queue_empty(portal)


def test_a_record_read_twice_is_one_request_and_faults_on_get_and_clear_lose_nothing(
        sandbox: devenv.Process, stack: Callable[..., Stack], redis_conn: redis.Redis) -> None:
    portal = SandboxView(sandbox.url)
    service, member_id, deals = lost_while_down(portal, stack, first_deal=40, documents=12)
    # The clear is dropped once (so the batch is read again and every record submitted twice), then applied with
    # its answer lost; the get's answer is lost once after it reserved, a get is dropped once, two are slow.
    portal.faults({"kind": "drop", "method": "event.offline.clear", "times": 1},
                  {"kind": "applied_then_timeout", "method": "event.offline.clear", "times": 1, "seconds": 2},
                  {"kind": "applied_then_timeout", "method": "event.offline.get", "times": 1, "seconds": 2},
                  {"kind": "drop", "method": "event.offline.get", "times": 1},
                  {"kind": "slow", "method": "event.offline.get", "times": 2, "seconds": 0.5})
    service.worker()
    assert_once_each(portal, redis_conn, deals, timeout=90)
    queue_empty(portal)
    clears = portal.calls("event.offline.clear")
    assert {c["fault"] for c in clears} >= {"drop", "applied_then_timeout"} and any(c["applied"] for c in clears)
    gets = portal.calls("event.offline.get")
    assert {c["fault"] for c in gets} >= {"applied_then_timeout", "drop"}
    state = {k.decode(): v.decode() for k, v in redis_conn.hgetall(offline.state_key(member_id)).items()}
    assert int(state["requests"]) == 12 and int(state["confirmed"]) == 12
    metrics = service.http.get("/metrics", headers=bearer(METRICS_TOKEN)).text
    assert "b24cancel_offline_records" in metrics and 'outcome="repeat"' in metrics


def test_a_worker_killed_inside_a_pass_leaves_the_batch_for_the_next_one(
        sandbox: devenv.Process, stack: Callable[..., Stack], redis_conn: redis.Redis) -> None:
    portal = SandboxView(sandbox.url)
    service, _, deals = lost_while_down(portal, stack, first_deal=60, documents=8)
    # Killed while the clear is on its way (after every submit): the clear lands later, or not at all.
    portal.faults({"kind": "slow", "method": "event.offline.clear", "times": 1, "seconds": 8})
    worker = service.worker()
    wait_for(lambda: portal.calls("event.offline.clear"), timeout=90, what="the pass to reach its clear")
    worker.kill_tree()
    service.workers = []
    assert queue_view(portal)["reserved"], "the batch is still reserved"
    # Killed after the get reserved, before it answered.
    portal.faults({"kind": "slow", "method": "event.offline.get", "times": 1, "seconds": 8})
    worker = service.worker()
    wait_for(lambda: [c for c in portal.calls("event.offline.get") if c["fault"] == "slow"], timeout=60,
             what="a pass inside its get")
    worker.kill_tree()
    service.workers = []
    service.worker()
    assert_once_each(portal, redis_conn, deals, timeout=120)
    queue_empty(portal, timeout=60)


def test_two_pullers_started_at_once_make_one_pass(
        sandbox: devenv.Process, stack: Callable[..., Stack], redis_conn: redis.Redis) -> None:
    portal = SandboxView(sandbox.url)
    prepare(portal)
    service = stack(workers=2, poll=600)
    member_id = install(portal, service)
    wait_for(lambda: redis_conn.hget(offline.state_key(member_id), "last_pull_at"), timeout=30,
             what="the first pull after the install")
    time.sleep(3)
    deals = {80 + doc: doc for doc in range(1, 7)}
    portal.faults({"kind": "slow", "method": "event.offline.get", "times": 1, "seconds": 3})
    before = len(portal.calls("event.offline.get"))
    for deal, doc in deals.items():
        lose(portal, deal, doc)
    q = Queue("cancel", connection=redis_conn, serializer=JSONSerializer)
    for name in ("a", "b"):
        q.enqueue(offline.PULL_JOB, member_id, "notice", job_id=f"offline-test-{name}")
    assert_once_each(portal, redis_conn, deals, timeout=60)
    gets = portal.calls("event.offline.get")[before:]
    slow = next(c for c in gets if c["fault"] == "slow")
    overlapping = [c for c in gets if c["seq"] > slow["seq"] and c["time"] < slow["time"] + 3]
    assert overlapping == [], "a second pass read the queue while the first one ran"


def test_without_reserve_the_puller_reads_with_clear_1(
        sandbox: devenv.Process, stack: Callable[..., Stack], redis_conn: redis.Redis) -> None:
    portal = SandboxView(sandbox.url)
    prepare(portal, reserve=False)
    service = stack(workers=1)
    member_id = install(portal, service)
    wait_for(lambda: redis_conn.hget(offline.state_key(member_id), "mode") == b"clear", timeout=30,
             what="the install to note the plan")
    deals = {100 + doc: doc for doc in range(1, 6)}
    for deal, doc in deals.items():
        lose(portal, deal, doc)
    assert_once_each(portal, redis_conn, deals, timeout=60)
    queue_empty(portal)
    gets = portal.calls("event.offline.get")
    assert gets and all(str((c["params"] or {}).get("clear")) == "1" for c in gets)
    assert not portal.calls("event.offline.clear")
    assert redis_conn.hlen(offline.STASH_KEY + member_id) == 0


def test_a_plan_that_loses_reserve_switches_to_clear_1_and_bad_records_are_confirmed_and_counted(
        sandbox: devenv.Process, stack: Callable[..., Stack], redis_conn: redis.Redis) -> None:
    portal = SandboxView(sandbox.url)
    prepare(portal)
    service = stack(workers=1)
    member_id = install(portal, service)
    wait_for(lambda: redis_conn.hget(offline.state_key(member_id), "mode") == b"reserve", timeout=30,
             what="the install to note the plan")
    portal.http.post("/_sandbox/config", json={"offline_reserve": False}).raise_for_status()
    portal.http.post("/_sandbox/offline", json={"event": "ONCRMDEALUPDATE", "data": {"FIELDS": {"ID": "x1"}}}
                     ).raise_for_status()
    portal.http.post("/_sandbox/offline", json={"event": "ONCRMLEADUPDATE", "data": {"FIELDS": {"ID": 5}}}
                     ).raise_for_status()
    deals = {120 + doc: doc for doc in range(1, 4)}
    for deal, doc in deals.items():
        lose(portal, deal, doc)
    assert_once_each(portal, redis_conn, deals, timeout=60)
    queue_empty(portal)
    assert redis_conn.hget(offline.state_key(member_id), "mode") == b"clear"
    refused = [c for c in portal.calls("event.offline.get") if c["error"] == "ACCESS_DENIED"]
    assert refused and str(refused[0]["params"].get("clear")) == "0"
    assert portal.calls("feature.get")
    metrics = service.http.get("/metrics", headers=bearer(METRICS_TOKEN)).text
    assert 'outcome="malformed"' in metrics and 'outcome="no_rule"' in metrics
    [shown] = [p for p in service.http.get("/v1/portals").json()["portals"] if p.get("offline")]
    assert shown["offline"]["mode"] == "clear" and shown["offline"]["ignored"] == 2


def test_offline_delivery_is_refused_for_a_configured_portal(tmp_path: Path) -> None:
    from settings import SettingsError, portals_from_file

    path = tmp_path / "portals.toml"
    path.write_text(textwrap.dedent("""
        [portals.shop]
        webhook_url = "https://shop.bitrix24.com/rest/1/xxxxxxxx/"
        chat = "chat42"

        [[portals.shop.rules]]
        event = "ONCRMDEALUPDATE"
        read = "crm.item.get"
        documents_field = "ufCrm_InventoryDocs"
        delivery = "offline"
    """))
    with pytest.raises(SettingsError, match=r"portals\.shop\.rules\.0\.delivery: \"offline\" needs the app"):
        portals_from_file(path)
    path.write_text(path.read_text().replace('delivery = "offline"', 'delivery = "online"'))
    portals, _, _ = portals_from_file(path)
    assert portals["shop"].rules[0]["delivery"] == "online"


def test_a_pass_stopped_after_some_submits_leaves_the_batch_reserved_and_the_next_one_finishes_it(
        sandbox: devenv.Process, stack: Callable[..., Stack], redis_conn: redis.Redis) -> None:
    from jobs import records

    portal = SandboxView(sandbox.url)
    service, member_id, deals = lost_while_down(portal, stack, first_deal=140, documents=6)
    # The fourth record's idempotency key is unreadable (a Redis error on its submit): the pass stops after
    # three submits, before the clear, as a pass killed there would.
    fourth = sorted(queue_view(portal)["records"], key=lambda r: int(r["ID"]))[3]
    poisoned = records.idempotency_key(f"app-{member_id}", "event", "bitrix24",
                                       f"offline|{fourth['MESSAGE_ID']}|{fourth['ID']}")
    redis_conn.set(poisoned, "not a hash")
    service.worker()
    # A pass of the killed workers may hold the portal's lease until it lapses (LEASE_SECONDS).
    wait_for(lambda: redis_conn.hget(offline.state_key(member_id), "last_error"), timeout=90,
             what="the pass to stop at the fourth record")
    view = queue_view(portal)
    assert len(view["records"]) == 6 and len(view["reserved"]) == 1  # nothing lost, the batch still reserved
    [process_id] = view["reserved"]
    assert redis_conn.hget(offline.state_key(member_id), "process_id") == process_id.encode()
    made = [r for r in requests_of(redis_conn) if r.get("delivery") == "offline"]
    assert len(made) == 3
    assert not portal.calls("event.offline.clear")
    redis_conn.delete(poisoned)  # the transient failure is over: the next scheduled pass finishes the batch
    assert_once_each(portal, redis_conn, deals, timeout=60)
    queue_empty(portal)
