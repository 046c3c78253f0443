"""The service as a Bitrix24 app, over real processes: gunicorn, rq workers, our Redis and sandbox portals.

The sandbox installs the app (ONAPPINSTALL to the real web process), runs the robot in a workflow, fires
bound events and uninstalls; each test asserts on what the sandbox received (calls, workflows' returned values,
chat messages, document statuses) and on Redis.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

import devenv
from jobs.app import ROBOT_CODE
from registry import PORTALS_SET, portal_key
from tests.helpers import API_KEY, SandboxView, bearer, wait_for

CLIENT_ID, CLIENT_SECRET = "sandbox-client", "sandbox-secret"  # the sandbox app's credentials
WORKER_OPTIONS = {"--job-monitoring-interval": "2", "--maintenance-interval": "2"}
RULES = textwrap.dedent("""
    [app]
    language = "en"

    [[app.rules]]
    event = "ONCRMDEALUPDATE"
    read = "crm.item.get"
    params = { entityTypeId = 2 }
    when = { stageId = ["C1:LOSE"] }
    documents_field = "ufCrm_InventoryDocs"
    reason = "Deal {id} moved to {stageId}"
""")


class Stack:
    """A web process and workers configured as the app, and the portals (sandboxes) it is installed on."""

    def __init__(self, redis_url: str, tmp: Path, client_id: str = CLIENT_ID, rules: str = RULES,
                 extra_env: dict[str, str] | None = None) -> None:
        self.redis_url = redis_url
        self.tmp = tmp
        self.port = devenv.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        portals = tmp / f"portals-{self.port}.toml"
        portals.write_text(rules)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("B24_", "TRIGGER_", "SENTRY_", "REDIS_"))}
        env.update({"REDIS_URL": redis_url, "B24_PORTALS_FILE": str(portals), "TRIGGER_API_KEYS": API_KEY,
                    "B24_APP_CLIENT_ID": client_id, "B24_APP_CLIENT_SECRET": CLIENT_SECRET,
                    "B24_APP_OAUTH_SERVER": "portal", "PUBLIC_URL": self.url,
                    "HOST": "127.0.0.1", "PORT": str(self.port), "WEB_CONCURRENCY": "2",
                    "B24_READ_TIMEOUT": "1.5", "B24_CONNECT_TIMEOUT": "1", "B24_EXECUTION_LIMIT": "3",
                    **(extra_env or {})})
        self.env = env
        self.web = devenv.start_web(env, log=tmp / f"web-{self.port}.log")
        self.workers: list[devenv.Process] = []
        self.started = 0
        self.http = httpx.Client(base_url=self.url, headers=bearer(), timeout=15)

    def worker(self) -> devenv.Process:
        self.started += 1
        proc = devenv.start_worker(self.env, log=self.tmp / f"worker-{self.port}-{self.started}.log",
                                   options=WORKER_OPTIONS)
        self.workers.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.workers:
            proc.kill_tree()
        self.web.stop()

    def request(self, request_id: str) -> dict[str, Any]:
        return self.http.get(f"/v1/requests/{request_id}").json()  # type: ignore[no-any-return]

    def finished(self, request_id: str, timeout: float = 60) -> dict[str, Any]:
        def ended() -> dict[str, Any]:
            state = self.request(request_id)
            return state if state["state"] in ("done", "failed") else {}

        return wait_for(ended, timeout=timeout, interval=0.25, what=f"request {request_id} to finish")


@pytest.fixture
def stack(redis_conn: redis.Redis, redis_url: str, tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    """Start stacks on our (emptied) Redis; all are stopped at the end."""
    started: list[Stack] = []

    def start(client_id: str = CLIENT_ID, workers: int = 1) -> Stack:
        made = Stack(redis_url, tmp_path, client_id)
        started.append(made)
        for _ in range(workers):
            made.worker()
        return made

    yield start
    for made in started:
        made.stop()


def install(portal: SandboxView, stack: Stack) -> dict[str, Any]:
    answer = portal.http.post("/_sandbox/app/install", json={"url": f"{stack.url}/v1/bitrix24/app/install"})
    answer.raise_for_status()
    return answer.json()  # type: ignore[no-any-return]


def app_state(portal: SandboxView) -> dict[str, Any]:
    return portal.http.get("/_sandbox/app").json()  # type: ignore[no-any-return]


def set_up(portal: SandboxView) -> dict[str, Any]:
    """Wait until the service's setup job registered the robot and bound its handlers."""
    return wait_for(lambda: (s := app_state(portal))["robots"] and s, timeout=30, what="the robot to be added")


def member_of(portal: SandboxView) -> str:
    return str(portal.http.get("/_sandbox/config").json()["member_id"])


def run_robot(portal: SandboxView, properties: dict[str, Any], deliveries: int = 1) -> dict[str, Any]:
    answer = portal.http.post("/_sandbox/robots/run", json={
        "code": ROBOT_CODE, "document_id": ["crm", "CCrmDocumentDeal", "DEAL_5"], "properties": properties,
        "deliveries": deliveries})
    answer.raise_for_status()
    return answer.json()  # type: ignore[no-any-return]


def workflow(portal: SandboxView, workflow_id: str) -> dict[str, Any]:
    return next(w for w in portal.http.get("/_sandbox/workflows").json() if w["workflow_id"] == workflow_id)


def accepted_sends(portal: SandboxView) -> list[dict[str, Any]]:
    return [c for c in portal.calls("bizproc.event.send") if c["applied"]]


def request_id_of(run: dict[str, Any]) -> str:
    return str(httpx.Response(200, text=run["delivery"]["body"]).json()["request_id"])


def reports(portal: SandboxView, request_id: str) -> list[dict[str, Any]]:
    return [m for m in portal.messages() if f"#{request_id}" in (m.get("message") or "")]


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def queued(conn: redis.Redis) -> int:
    return int(conn.llen("rq:queue:cancel")) + int(conn.llen("rq:queue:notify"))


# ---- install ---------------------------------------------------------------------------------------------

def test_install_verifies_stores_binds_and_adds_the_robot_once(
        sandbox: devenv.Process, stack: Callable[..., Stack], redis_conn: redis.Redis) -> None:
    portal = SandboxView(sandbox.url)
    service = stack()
    answer = install(portal, service)
    assert answer["status"] == 200, answer
    member_id = member_of(portal)
    state = set_up(portal)
    assert {b["event"] for b in state["bindings"]} == {"ONCRMDEALUPDATE", "ONAPPUNINSTALL"}
    assert {b["handler"] for b in state["bindings"]} == {f"{service.url}/v1/bitrix24/events",
                                                          f"{service.url}/v1/bitrix24/app/install"}
    [robot] = state["robots"]
    assert robot["code"] == ROBOT_CODE and robot["USE_SUBSCRIPTION"] == "Y"
    assert set(robot["RETURN_PROPERTIES"]) == {"outcome", "cancelled_count", "failed_count", "details", "request_id"}
    stored = {text(k): text(v) for k, v in redis_conn.hgetall(portal_key(member_id)).items()}
    assert stored["domain"] == sandbox.url.removeprefix("http://")
    assert stored["application_token"] == state["application_token"]
    chat = wait_for(lambda: redis_conn.hget(portal_key(member_id), "chat"), timeout=20, what="the report chat")
    assert any(c["id"] == text(chat) for c in portal.http.get("/_sandbox/chats").json())
    listed = wait_for(lambda: (p := service.http.get("/v1/portals").json()["portals"]) and p[0]["setup"] == "done"
                      and p, timeout=20, what="the setup to be done")
    assert [p["name"] for p in listed] == [f"app-{member_id}"]
    assert listed[0]["auth"] == "installed app"
    page = service.http.get("/v1/portals").text
    assert state["application_token"] not in page

    # the queue delivers the same callback again: one portal, nothing bound or added twice
    binds = len(portal.calls("event.bind"))
    again = httpx.post(f"{service.url}/v1/bitrix24/app/install", data=answer["form"], timeout=10)
    assert again.status_code == 200 and again.json()["duplicate"] is True
    time.sleep(1.5)
    assert len(portal.calls("event.bind")) == binds
    assert redis_conn.smembers(PORTALS_SET) == {member_id.encode()}

    # a reinstall (new tokens and application token): Bitrix24 dropped the handlers, the installer binds again
    assert install(portal, service)["status"] == 200
    state = set_up(portal)
    assert len(state["bindings"]) == 2 and state["installs"] == 2
    assert text(redis_conn.hget(portal_key(member_id), "application_token")) == state["application_token"]
    assert [p["name"] for p in service.http.get("/v1/portals").json()["portals"]] == [f"app-{member_id}"]


def test_check_config_lists_installed_portals_without_a_restart(
        sandbox: devenv.Process, stack: Callable[..., Stack]) -> None:
    portal = SandboxView(sandbox.url)
    service = stack(workers=0)
    assert install(portal, service)["status"] == 200
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-m", "flask", "--app", "app", "check-config"], env=service.env,
                         capture_output=True, text=True, timeout=60, cwd=root, check=False)
    assert out.returncode == 0, out.stderr
    assert f"app-{member_of(portal)}" in out.stdout and "installed app" in out.stdout
    assert app_state(portal)["application_token"] not in out.stdout


# ---- the robot ------------------------------------------------------------------------------------------

def test_robot_call_cancels_reports_once_and_returns_the_outcome_once(
        sandbox: devenv.Process, stack: Callable[..., Stack], redis_conn: redis.Redis) -> None:
    portal = SandboxView(sandbox.url)
    service = stack()
    install(portal, service)
    set_up(portal)
    run = run_robot(portal, {"document_ids": [3, 4, 5], "reason": "Deal 5 lost"})
    assert run["delivery"]["status"] == 200, run
    request_id = request_id_of(run)
    state = service.finished(request_id)
    assert state["state"] == "done"
    assert {d["id"]: d["outcome"] for d in state["documents"]} == {3: "cancelled", 4: "cancelled", 5: "cancelled"}
    for doc_id in (3, 4, 5):
        assert portal.document(doc_id)["status"] != "Y"
    returned = wait_for(lambda: workflow(portal, run["workflow_id"])["returned"], timeout=20, what="returned values")
    assert returned["outcome"] == "cancelled"
    assert int(returned["cancelled_count"]) == 3 and int(returned["failed_count"]) == 0
    assert returned["request_id"] == request_id
    assert len(returned["details"].splitlines()) == 3
    assert len(accepted_sends(portal)) == 1
    assert state["workflow"]["state"] == "sent"
    assert any("b24-cancel request" in line for line in workflow(portal, run["workflow_id"])["log"])
    assert len(wait_for(lambda: reports(portal, request_id), timeout=20, what="the report")) == 1
    assert run["event_token"] not in service.http.get(f"/v1/requests/{request_id}").text


def test_the_same_robot_call_delivered_twice_is_one_request_and_one_event_send(
        sandbox: devenv.Process, stack: Callable[..., Stack]) -> None:
    portal = SandboxView(sandbox.url)
    service = stack()
    install(portal, service)
    set_up(portal)
    run = run_robot(portal, {"document_ids": [6, 7], "chat": "none"}, deliveries=2)
    first, second = (httpx.Response(200, text=d["body"]).json() for d in run["deliveries"])
    assert first["request_id"] == second["request_id"] and second.get("duplicate") is True
    state = service.finished(first["request_id"])
    assert state["state"] == "done"
    wait_for(lambda: workflow(portal, run["workflow_id"])["returned"], timeout=20, what="returned values")
    time.sleep(1)
    assert len(accepted_sends(portal)) == 1
    assert len(portal.calls("bizproc.event.send")) == 1
    assert reports(portal, first["request_id"]) == []  # chat = none: no chat report
    assert len(portal.calls("catalog.document.cancel")) == 2


def test_partly_cancelled_and_a_workflow_that_gave_up_are_recorded_not_retried(
        sandbox: devenv.Process, stack: Callable[..., Stack]) -> None:
    portal = SandboxView(sandbox.url)
    portal.permissions(hidden_document_ids=[9])
    service = stack(workers=0)
    install(portal, service)
    devenv.start_worker(service.env, log=service.tmp / "setup.log", burst=True).popen.wait(timeout=60)
    set_up(portal)
    partly = run_robot(portal, {"document_ids": [8, 9]})
    # A workflow that stopped waiting (timed out, or a person moved on): its token is spent before we answer.
    gave_up = run_robot(portal, {"document_ids": [10]})
    pair = portal.http.post("/_sandbox/oauth/tokens", json={}).json()
    spent = httpx.post(f"{sandbox.url}/rest/bizproc.event.send", json={
        "auth": pair["access_token"], "EVENT_TOKEN": gave_up["event_token"], "RETURN_VALUES": {"outcome": "x"}},
        timeout=5)
    assert spent.status_code == 200, spent.text
    service.worker()
    returned = wait_for(lambda: workflow(portal, partly["workflow_id"])["returned"], timeout=40, what="returned")
    assert returned["outcome"] == "partly"
    assert int(returned["cancelled_count"]) == 1 and int(returned["failed_count"]) == 1
    assert "#9" in returned["details"] and "not_found" in returned["details"]
    state = service.finished(request_id_of(gave_up))
    assert state["state"] == "done"
    assert state["workflow"]["state"] == "refused" and "ACCESS_DENIED" in state["workflow"]["error"]
    time.sleep(2)
    sends = [c for c in portal.calls("bizproc.event.send") if c["params"].get("EVENT_TOKEN") == gave_up["event_token"]]
    assert [c["error"] for c in sends] == [None, "ACCESS_DENIED"]  # ours was sent once, refused, not retried
    assert len(reports(portal, request_id_of(gave_up))) == 1  # the chat still hears of it


def test_a_robot_that_names_no_document_tells_its_workflow_it_failed(
        sandbox: devenv.Process, stack: Callable[..., Stack]) -> None:
    portal = SandboxView(sandbox.url)
    service = stack()
    install(portal, service)
    set_up(portal)
    run = run_robot(portal, {"reason": "no documents filled in"})
    assert run["delivery"]["status"] == 200, run
    state = service.finished(request_id_of(run))
    assert state["state"] == "failed" and "named no documents" in state["error"]
    returned = wait_for(lambda: workflow(portal, run["workflow_id"])["returned"], timeout=20, what="returned")
    assert returned["outcome"] == "failed" and int(returned["cancelled_count"]) == 0
    assert "named no documents" in returned["details"]
    assert portal.calls("catalog.document.cancel") == [] and reports(portal, request_id_of(run)) == []


def test_a_worker_killed_between_the_cancel_and_event_send_still_sends_once(
        sandbox: devenv.Process, stack: Callable[..., Stack], redis_conn: redis.Redis) -> None:
    portal = SandboxView(sandbox.url)
    service = stack()
    install(portal, service)
    set_up(portal)
    # The event.send is applied by the portal 4 s after it arrives: the worker is killed meanwhile.
    portal.faults({"kind": "slow", "method": "bizproc.event.send", "times": 1, "seconds": 4})
    run = run_robot(portal, {"document_ids": [11, 12, 13]})
    request_id = request_id_of(run)
    key = f"b24c:req:{request_id}"
    wait_for(lambda: redis_conn.hget(key, "workflow_state") == b"sending", timeout=40, interval=0.05,
             what="the event.send to be under way")
    time.sleep(0.3)
    service.workers[0].kill_tree()  # worker, scheduler and work-horse, as a container kill
    assert redis_conn.hget(key, "state") not in (b"done", b"failed")
    service.worker()
    state = service.finished(request_id, timeout=200)
    assert state["state"] == "done"
    assert {d["outcome"] for d in state["documents"]} == {"cancelled"}
    returned = workflow(portal, run["workflow_id"])["returned"]
    assert returned and returned["outcome"] == "cancelled" and int(returned["cancelled_count"]) == 3
    assert len(accepted_sends(portal)) == 1  # a re-send after the ambiguity wait is refused: token spent
    assert state["workflow"]["state"] in ("sent", "unsure")
    for doc_id in (11, 12, 13):
        assert portal.effective_cancels(doc_id) == 1
    assert len(wait_for(lambda: reports(portal, request_id), timeout=30, what="the report")) == 1


@pytest.mark.parametrize("fault", ["applied_then_timeout", "drop"])
def test_event_send_whose_answer_is_lost_or_dropped_returns_the_outcome_exactly_once(
        sandbox: devenv.Process, stack: Callable[..., Stack], fault: str) -> None:
    portal = SandboxView(sandbox.url)
    service = stack()
    install(portal, service)
    set_up(portal)
    # applied_then_timeout: the portal applies the send, its answer is lost. drop: the send never arrives.
    portal.faults({"kind": fault, "method": "bizproc.event.send", "times": 1})
    run = run_robot(portal, {"document_ids": [11, 12]})
    request_id = request_id_of(run)
    state = service.finished(request_id, timeout=200)
    assert state["state"] == "done" and {d["outcome"] for d in state["documents"]} == {"cancelled"}
    returned = wait_for(lambda: workflow(portal, run["workflow_id"])["returned"], timeout=60, what="returned")
    assert returned["outcome"] == "cancelled" and int(returned["cancelled_count"]) == 2
    assert len(accepted_sends(portal)) == 1  # from the sandbox's own log: one send took effect
    for doc_id in (11, 12):
        assert portal.effective_cancels(doc_id) == 1
    assert len(wait_for(lambda: reports(portal, request_id), timeout=30, what="the report")) == 1


# ---- events through the app --------------------------------------------------------------------------------

def test_a_bound_event_from_a_crm_change_cancels_its_documents(
        sandbox: devenv.Process, stack: Callable[..., Stack]) -> None:
    portal = SandboxView(sandbox.url)
    service = stack()
    install(portal, service)
    set_up(portal)
    portal.http.post("/_sandbox/crm/items", json={"entityTypeId": 2, "id": 21, "fields": {
        "stageId": "C1:WON", "ufCrm_InventoryDocs": [14]}}).raise_for_status()  # an add: not bound
    changed = portal.http.post("/_sandbox/crm/items", json={"entityTypeId": 2, "id": 21, "fields": {
        "stageId": "C1:LOSE", "ufCrm_InventoryDocs": [14]}}).json()
    [fired] = changed["fired"]
    assert fired["event"] == "ONCRMDEALUPDATE" and fired["status"] == 200, fired
    request_id = httpx.Response(200, text=fired["body"]).json()["request_id"]
    state = service.finished(request_id)
    assert state["state"] == "done" and state["documents"][0]["outcome"] == "cancelled"
    assert portal.document(14)["status"] != "Y"


# ---- uninstall ---------------------------------------------------------------------------------------------

def test_uninstall_ends_queued_requests_and_nothing_reaches_the_portal_after(
        sandbox: devenv.Process, stack: Callable[..., Stack], redis_conn: redis.Redis) -> None:
    portal = SandboxView(sandbox.url)
    service = stack(workers=0)
    install(portal, service)
    member_id = member_of(portal)
    # set the portal up by hand-free means: one worker in burst mode runs the setup job and exits
    devenv.start_worker(service.env, log=service.tmp / "burst.log", burst=True).popen.wait(timeout=60)
    set_up(portal)
    token = app_state(portal)["application_token"]
    runs = [run_robot(portal, {"document_ids": [doc]}) for doc in (15, 16)]
    ids = [request_id_of(run) for run in runs]
    assert queued(redis_conn) == 2
    calls_before = len(portal.calls())
    gone = portal.http.post("/_sandbox/app/uninstall").json()
    assert [d["status"] for d in gone["deliveries"]] == [200], gone
    assert not redis_conn.exists(portal_key(member_id))
    assert not redis_conn.keys(f"b24c:oauth:{{app-{member_id}}}*")
    service.worker()
    for request_id in ids:
        state = service.finished(request_id)
        assert state["state"] == "failed"
        assert state["error"] == "app uninstalled"
    time.sleep(1)
    assert len(portal.calls()) == calls_before  # no call reached the portal after the uninstall
    for doc in (15, 16):
        assert portal.document(doc)["status"] == "Y"
    # its events and robot calls are refused now, with its old application token
    sent = portal.http.post("/_sandbox/events/send", json={
        "url": f"{service.url}/v1/bitrix24/events", "event": "ONCRMDEALUPDATE", "id": 21,
        "application_token": token}).json()
    assert sent["status"] == 401
    robot = httpx.post(f"{service.url}/v1/bitrix24/app/robot", data={
        "event_token": "t1", "properties[document_ids]": "3", "auth[member_id]": member_id,
        "auth[application_token]": token, "auth[domain]": sandbox.url.removeprefix("http://")}, timeout=10)
    assert robot.status_code == 401
    assert queued(redis_conn) == 0


# ---- forgeries ---------------------------------------------------------------------------------------------

def test_forged_install_robot_and_events_get_401_with_nothing_stored_or_enqueued(
        sandbox: devenv.Process, stack: Callable[..., Stack], redis_conn: redis.Redis) -> None:
    portal = SandboxView(sandbox.url)
    member_id = member_of(portal)
    domain = sandbox.url.removeprefix("http://")
    service = stack(workers=0)
    install_url = f"{service.url}/v1/bitrix24/app/install"
    forged = {"event": "ONAPPINSTALL", "auth[domain]": domain, "auth[client_endpoint]": f"{sandbox.url}/rest/",
              "auth[member_id]": member_id, "auth[access_token]": "made-up", "auth[refresh_token]": "made-up",
              "auth[application_token]": "mine"}
    assert httpx.post(install_url, data=forged, timeout=10).status_code == 401
    # real tokens, but another member_id, or another domain
    real = install(portal, stack(workers=0))["form"]  # a second service instance receives the real callback
    redis_conn.flushdb()
    wrong_member = {**real, "auth[member_id]": "0123456789abcdef0123456789abcdef"}
    assert httpx.post(install_url, data=wrong_member, timeout=10).status_code == 401
    real_again = install(portal, stack(workers=0))["form"]
    redis_conn.flushdb()
    wrong_domain = {**real_again, "auth[domain]": "evil.example.com"}
    assert httpx.post(install_url, data=wrong_domain, timeout=10).status_code == 401
    assert not redis_conn.keys("b24c:app:*") and not redis_conn.keys("b24c:oauth:*")
    assert queued(redis_conn) == 0

    # an app with another client_id: the OAuth server refuses the refresh token for it
    other = stack(client_id="someone-else", workers=0)
    answer = install(portal, other)
    assert answer["status"] == 401
    assert not redis_conn.keys("b24c:app:*")

    # now a real install, and forged calls against it
    assert install(portal, service)["status"] == 200
    token = app_state(portal)["application_token"]
    base = {"event_token": "tok-1", "properties[document_ids]": "3", "auth[member_id]": member_id,
            "auth[domain]": domain}
    robot_url = f"{service.url}/v1/bitrix24/app/robot"
    before = queued(redis_conn)
    assert httpx.post(robot_url, data={**base, "auth[application_token]": "wrong"}, timeout=10).status_code == 401
    assert httpx.post(robot_url, data={**base, "auth[application_token]": token,
                                       "auth[member_id]": "ffffffffffffffffffffffffffffffff"},
                      timeout=10).status_code == 401
    assert httpx.post(robot_url, data=base, timeout=10).status_code == 401
    events_url = f"{service.url}/v1/bitrix24/events"
    event = {"event": "ONCRMDEALUPDATE", "data[FIELDS][ID]": "5", "ts": "1766047124", "auth[member_id]": member_id,
             "auth[domain]": domain}
    assert httpx.post(events_url, data={**event, "auth[application_token]": "wrong"}, timeout=10).status_code == 401
    assert httpx.post(events_url, data={**event, "auth[application_token]": token,
                                        "auth[member_id]": "ffffffffffffffffffffffffffffffff"},
                      timeout=10).status_code == 401
    assert httpx.post(events_url, data={**event, "auth[application_token]": token,
                                        "auth[domain]": "evil.example.com"}, timeout=10).status_code == 401
    uninstall_forged = {"event": "ONAPPUNINSTALL", "auth[member_id]": member_id, "auth[application_token]": "wrong"}
    assert httpx.post(install_url, data=uninstall_forged, timeout=10).status_code == 401
    assert httpx.post(events_url, data=uninstall_forged, timeout=10).status_code == 401
    assert redis_conn.exists(portal_key(member_id))
    assert queued(redis_conn) == before
    assert not [k for k in redis_conn.keys("b24c:req:*")]
    # the genuine token is accepted (the event is queued), so the refusals above were the token's doing
    assert httpx.post(events_url, data={**event, "auth[application_token]": token}, timeout=10).status_code == 200
    assert queued(redis_conn) == before + 1


# ---- several portals ---------------------------------------------------------------------------------------

def test_three_portals_installed_at_once_refresh_their_own_tokens_single_flight(
        sandbox_factory: Callable[..., devenv.Process], stack: Callable[..., Stack],
        redis_conn: redis.Redis) -> None:
    lifetime = 6
    members = ["aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa1", "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb2", "ccccccccccccccccccccccccccccccc3"]
    portals = [SandboxView(sandbox_factory("--documents", "30", "--durations-zero", "--member-id", member,
                                           "--token-lifetime", str(lifetime)).url) for member in members]
    service = stack(workers=3)
    for portal in portals:
        assert install(portal, service)["status"] == 200
    for portal in portals:
        set_up(portal)
    listed = {p["name"] for p in service.http.get("/v1/portals").json()["portals"]}
    assert listed == {f"app-{member}" for member in members}
    pairs = {redis_conn.hget(f"b24c:oauth:{{app-{member}}}", "access_token") for member in members}
    assert len(pairs) == 3
    time.sleep(lifetime + 1)  # every stored access token has expired
    # Requests through the API (a robot call would bring fresh tokens of its own): 4 per portal, 3 workers.
    ids = []
    for member in members:
        for doc in (20, 21, 22, 23):
            answer = service.http.post("/v1/cancel", json={"portal": f"app-{member}", "document_ids": [doc]},
                                       headers={"Idempotency-Key": f"{member}-{doc}"})
            assert answer.status_code == 202, answer.text
            ids.append(answer.json()["request_id"])
    for request_id in ids:
        state = service.finished(request_id, timeout=90)
        assert state["state"] == "done", state
    for portal in portals:
        stats = portal.http.get("/_sandbox/stats").json()
        # one refresh at install (its verification) and exactly one after expiry, whatever the workers did
        assert stats["oauth_refreshes"] == 2, stats
        assert stats["oauth_refresh_errors"] == 0
        for doc in (20, 21, 22, 23):
            assert portal.document(doc)["status"] != "Y"


# ---- the sandbox's app methods, as documented ----------------------------------------------------------------

def test_sandbox_app_methods_refuse_webhooks_and_validate_robots(sandbox: devenv.Process) -> None:
    portal = SandboxView(sandbox.url)
    hook = sandbox.extra["webhook"]
    portal.permissions(scopes=["catalog", "im", "bizproc"])  # a webhook with the scope: still no app context
    for name in ("event.bind", "event.get", "bizproc.robot.add", "bizproc.event.send", "app.info"):
        answer = httpx.post(f"{hook}{name}", json={"event": "ONCRMDEALUPDATE", "handler": "http://127.0.0.1/x"})
        assert answer.json()["error"] == "ACCESS_DENIED", name
        assert "Application context required" in answer.json()["error_description"]
    # an app context: a pair issued for the sandbox app, installed to a URL nobody listens on
    portal.http.post("/_sandbox/app/install", json={"url": f"http://127.0.0.1:{devenv.free_port()}/install"})
    token = portal.http.post("/_sandbox/oauth/tokens", json={}).json()["access_token"]

    def call(name: str, **params: Any) -> dict[str, Any]:
        return httpx.post(f"{sandbox.url}/rest/{name}", json={"auth": token, **params}, timeout=5).json()  # type: ignore[no-any-return]

    assert call("event.bind", event="ONNOSUCHEVENT", handler="http://127.0.0.1/h")["error"] == "ERROR_EVENT_NOT_FOUND"
    assert call("event.bind", event="ONCRMDEALUPDATE", handler="http://127.0.0.1/h")["result"] is True
    assert call("event.bind", event="ONCRMDEALUPDATE", handler="http://127.0.0.1/h")["error"] == \
        "ERROR_HANDLER_ALREADY_EXIST"
    assert call("event.get")["result"] == [{"event": "ONCRMDEALUPDATE", "handler": "http://127.0.0.1/h",
                                            "auth_type": 0, "offline": 0}]
    assert call("event.unbind", event="ONCRMDEALUPDATE", handler="http://127.0.0.1/h")["result"] == {"count": 1}
    good = {"CODE": "r1", "HANDLER": "http://127.0.0.1/robot", "NAME": {"en": "R"}, "USE_SUBSCRIPTION": "Y"}
    for fields, description in (({**good, "CODE": ""}, "Empty activity code!"),
                                ({**good, "CODE": "bad code"}, "Wrong activity code!"),
                                ({**good, "NAME": ""}, "Empty activity NAME!"),
                                ({**good, "PROPERTIES": {}}, "Wrong property key (0)!"),
                                ({**good, "PROPERTIES": {"p": {"Type": "int"}}}, "Empty property NAME (p)!")):
        refused = call("bizproc.robot.add", **fields)
        assert (refused["error"], refused["error_description"]) == ("ERROR_ACTIVITY_VALIDATION_FAILURE", description)
    assert call("bizproc.robot.add", **{**good, "HANDLER": "ftp://x/"})["error"] == "ERROR_UNSUPPORTED_PROTOCOL"
    assert call("bizproc.robot.add", **good)["result"] is True
    assert call("bizproc.robot.add", **good)["error"] == "ERROR_ACTIVITY_ALREADY_INSTALLED"
    assert call("bizproc.robot.list")["result"] == ["r1"]
    assert call("bizproc.event.send", EVENT_TOKEN="unknown", RETURN_VALUES={})["error"] == "ACCESS_DENIED"
    run = portal.http.post("/_sandbox/robots/run", json={"code": "r1", "properties": {"x": [1, 2]}}).json()
    assert call("bizproc.event.send", EVENT_TOKEN=run["event_token"], RETURN_VALUES={"a": 1})["result"] is True
    assert call("bizproc.event.send", EVENT_TOKEN=run["event_token"], RETURN_VALUES={"a": 2})["error"] == \
        "ACCESS_DENIED"
    [flow] = portal.http.get("/_sandbox/workflows").json()
    assert flow["returned"] == {"a": 1} and flow["properties"] == {"x": [1, 2]}
    assert "waiting" not in httpx.get(f"{sandbox.url}/").text and '{&quot;a&quot;: 1}' in httpx.get(sandbox.url).text
    assert call("bizproc.robot.delete", CODE="r1")["result"] is True
    assert call("bizproc.robot.delete", CODE="r1")["error"] == "ERROR_ACTIVITY_NOT_FOUND"


# ---- settings (pure logic) -----------------------------------------------------------------------------------

def test_the_service_starts_with_only_the_app_and_refuses_an_incomplete_one(tmp_path: Path) -> None:
    from settings import SettingsError, load_settings

    base = {"_env_file": None, "redis_url": "redis://127.0.0.1:1/0"}
    settings = load_settings(**base, b24_app_client_id="local.1", b24_app_client_secret="s",
                             public_url="https://cancel.example.com/")
    assert settings.portals == {} and settings.app is not None
    assert settings.app.url("/v1/bitrix24/app/robot") == "https://cancel.example.com/v1/bitrix24/app/robot"
    with pytest.raises(SettingsError, match="PUBLIC_URL: required"):
        load_settings(**base, b24_app_client_id="local.1", b24_app_client_secret="s")
    with pytest.raises(SettingsError, match="PUBLIC_URL: must use https"):
        load_settings(**base, b24_app_client_id="local.1", b24_app_client_secret="s",
                      public_url="http://cancel.example.com")
    path = tmp_path / "portals.toml"
    path.write_text(RULES.replace('[app]\nlanguage = "en"', '[app]\nlanguage = "ru"\nclient_id = "local.2"\n'
                                  'client_secret = "t"\npublic_url = "https://x.example.com"\nchat = "chat7"'))
    from_file = load_settings(**base, b24_portals_file=str(path))
    assert from_file.app is not None and from_file.app.client_id == "local.2" and from_file.app.chat == "chat7"
    assert from_file.app.language == "ru" and [r["event"] for r in from_file.app.rules] == ["ONCRMDEALUPDATE"]
    overridden = load_settings(**base, b24_portals_file=str(path), b24_app_client_id="local.3")
    assert overridden.app is not None and overridden.app.client_id == "local.3"
    path.write_text('[app]\nclient_id = "a"\nclient_secret = "b"\npublic_url = "https://x.example.com"\nwho = 1\n')
    with pytest.raises(SettingsError, match="app.who: unknown key"):
        load_settings(**base, b24_portals_file=str(path))


def test_return_values_name_the_outcome_and_every_document() -> None:
    from jobs.app import return_values

    def values(*outcomes: str) -> dict[str, Any]:
        docs = [{"id": n, "outcome": o, "title": f"Doc {n}", "detail": "why" if o in ("refused", "failed") else None}
                for n, o in enumerate(outcomes, start=1)]
        return return_values({"id": "r1", "documents": docs})

    assert values("cancelled", "already_not_conducted")["outcome"] == "cancelled"
    assert values("already_not_conducted")["outcome"] == "nothing_to_do"
    partly = values("cancelled", "refused", "not_found")
    assert (partly["outcome"], partly["cancelled_count"], partly["failed_count"]) == ("partly", 1, 2)
    assert partly["details"].splitlines() == ["#1 Doc 1: cancelled", "#2 Doc 2: refused (why)", "#3 Doc 3: not_found"]
    assert values("failed", "refused")["outcome"] == "failed"
    assert values()["outcome"] == "failed" and values()["request_id"] == "r1"
