"""The portal's whole state in one object guarded by one lock: documents, chats, limits, call log."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sandbox.config import PORTAL_TZ, WEBHOOK_USER_ID, Config
from sandbox.faults import FaultBook
from sandbox.limits import LeakyBucket, OperatingBudget
from sandbox.oauth import TokenStore

# Document types REST exposes (`catalog.enum.getStoreDocumentTypes`); others never appear in lists.
REST_DOC_TYPES = ("A", "S", "M", "R", "D")
DOC_STATUSES = ("Y", "N", "C")

# Seeded documents are dated from here on, one hour apart, so they never depend on today's date.
SEED_BASE_DATE = datetime(2026, 11, 2, 9, 0, 0, tzinfo=PORTAL_TZ)

# The call log keeps this many entries (oldest dropped first), so a long benchmark stays in memory.
CALL_LOG_LIMIT = 50_000

# Chat ids for private dialogs start here, far from group chat ids.
PRIVATE_CHAT_ID_BASE = 1000

SEED_SUBJECTS: dict[str, list[str]] = {
    "en": ["office chairs", "printer paper", "spare parts", "monitors", "packaging", "coffee beans",
           "cables", "safety boots", "desk lamps", "toner cartridges"],
    "ru": ["офисные кресла", "бумага для принтера", "запчасти", "мониторы", "упаковка", "кофе в зернах",
           "кабели", "защитная обувь", "настольные лампы", "картриджи"],
}
SEED_TYPE_WORDS: dict[str, dict[str, str]] = {
    "en": {"A": "Arrival", "S": "Adjustment", "M": "Moving", "R": "Return", "D": "Write-off"},
    "ru": {"A": "Приход", "S": "Оприходование", "M": "Перемещение", "R": "Возврат", "D": "Списание"},
}

SEED_USERS: dict[int, dict[str, Any]] = {
    1: {"id": 1, "name": "Anna Admin", "first_name": "Anna", "last_name": "Admin"},
    2: {"id": 2, "name": "Boris Storekeeper", "first_name": "Boris", "last_name": "Storekeeper"},
    3: {"id": 3, "name": "Vera Accountant", "first_name": "Vera", "last_name": "Accountant"},
}


def portal_date(ts: float) -> str:
    """A unix time as Bitrix24 prints dates: ISO 8601 with the portal's offset."""
    return datetime.fromtimestamp(ts, PORTAL_TZ).isoformat(timespec="seconds")


def document_number(doc_id: int) -> str:
    """The predictable docNumber of document `doc_id` (seeded or added without one)."""
    return f"DOC-{doc_id:04d}"


def new_document(doc_id: int, doc_type: str = "A", status: str = "Y", title: str = "",
                 when: datetime | None = None) -> dict[str, Any]:
    """A complete document record with every REST field filled."""
    when = when or SEED_BASE_DATE
    status_date = (when + timedelta(minutes=30)).isoformat()
    return {
        "id": doc_id,
        "docType": doc_type,
        "docNumber": document_number(doc_id),
        "title": title,
        "status": status,
        "currency": "RUB",
        "total": 0.0,
        "responsibleId": WEBHOOK_USER_ID,
        "createdBy": WEBHOOK_USER_ID,
        "modifiedBy": WEBHOOK_USER_ID,
        "statusBy": WEBHOOK_USER_ID if status != "N" else None,
        "siteId": "s1",
        "commentary": "",
        "dateCreate": when.isoformat(),
        "dateModify": status_date,
        "dateStatus": status_date if status != "N" else None,
        "dateDocument": when.isoformat(),
    }


def seed_documents(count: int, seed: int, language: str) -> dict[int, dict[str, Any]]:
    """Documents 1..count, all conducted, with types, titles and totals drawn from `seed`.

    Types are dealt in shuffled blocks of five (A, S, M, R, D in a seed-dependent order), so
    documents 1..5 cover every type and the mix stays even.
    """
    rng = random.Random(seed)
    words = SEED_TYPE_WORDS.get(language, SEED_TYPE_WORDS["en"])
    subjects = SEED_SUBJECTS.get(language, SEED_SUBJECTS["en"])
    deck: list[str] = []
    while len(deck) < count:
        block = list(REST_DOC_TYPES)
        rng.shuffle(block)
        deck += block
    documents: dict[int, dict[str, Any]] = {}
    for doc_id in range(1, count + 1):
        doc_type = deck[doc_id - 1]
        subject = rng.choice(subjects)
        doc = new_document(doc_id, doc_type, "Y", f"{words[doc_type]} {doc_id}: {subject}",
                           SEED_BASE_DATE + timedelta(hours=doc_id))
        doc["total"] = round(rng.uniform(100, 50_000), 2)
        doc["responsibleId"] = rng.choice(list(SEED_USERS))
        documents[doc_id] = doc
    return documents


@dataclass
class Chat:
    """A group chat (`chatN`) or a private dialog (a user id) and who is in it."""

    dialog_id: str
    chat_id: int
    title: str
    members: set[int]

    def public(self) -> dict[str, Any]:
        """The chat as JSON for the control API."""
        return {"id": self.dialog_id, "chat_id": self.chat_id, "title": self.title,
                "members": sorted(self.members)}


@dataclass
class Message:
    """A chat message as stored by `im.message.add`."""

    id: int
    chat_id: int
    dialog_id: str
    author_id: int
    text: str
    attach: Any
    date: float
    # The message this one replies to (im.message.add's REPLY_ID), in the same chat.
    reply_id: int | None = None

    def public(self) -> dict[str, Any]:
        """The message as `/_sandbox/messages` shows it."""
        return {"id": self.id, "dialog_id": self.dialog_id, "message": self.text,
                "attach": self.attach, "author_id": self.author_id, "date": portal_date(self.date),
                "reply_id": self.reply_id}


@dataclass
class Permissions:
    """What the webhook user may do; each refusal is switched on through `/_sandbox/permissions`."""

    deny_cancel_doc_types: set[str] = field(default_factory=set)
    deny_warehouse: bool = False
    inventory_enabled: bool = True
    plan_has_inventory: bool = True
    hidden_document_ids: set[int] = field(default_factory=set)
    scopes: list[str] = field(default_factory=list)
    # The user behind the app's tokens is an administrator (offline events need one).
    app_admin: bool = True

    def public(self) -> dict[str, Any]:
        """The permissions as JSON."""
        return {
            "deny_cancel_doc_types": sorted(self.deny_cancel_doc_types),
            "deny_warehouse": self.deny_warehouse,
            "inventory_enabled": self.inventory_enabled,
            "plan_has_inventory": self.plan_has_inventory,
            "hidden_document_ids": sorted(self.hidden_document_ids),
            "scopes": list(self.scopes),
            "app_admin": self.app_admin,
        }


class Portal:
    """The sandbox's state. Hold `lock` while reading or changing anything here."""

    def __init__(self, config: Config) -> None:
        self.start_config = config.copy()
        self.lock = threading.RLock()
        self.generation = 0
        self.reset()

    def reset(self, documents: int | None = None) -> None:
        """Back to the start state: same seed and CLI configuration (optionally another document count)."""
        with self.lock:
            self.generation += 1
            self.config = self.start_config.copy()
            count = self.config.documents if documents is None else documents
            self.documents: dict[int, dict[str, Any]] = seed_documents(count, self.config.seed,
                                                                       self.config.language)
            self.users: dict[int, dict[str, Any]] = {k: dict(v) for k, v in SEED_USERS.items()}
            self.chats: dict[str, Chat] = {
                "chat1": Chat("chat1", 1, "Inventory reports", {WEBHOOK_USER_ID, 2}),
            }
            self.messages: list[Message] = []
            self.next_message_id = 1
            self.crm_items: dict[tuple[int, int], dict[str, Any]] = {}
            self.shipments: dict[int, dict[str, Any]] = {}
            self.permissions = Permissions(scopes=list(self.config.scopes))
            self.calls: deque[dict[str, Any]] = deque(maxlen=CALL_LOG_LIMIT)
            self.next_seq = 1
            self.stats: dict[str, Any] = {
                "requests": 0, "by_method": Counter(), "by_error": Counter(), "by_status": Counter(),
                "oauth_refreshes": 0, "oauth_refresh_errors": 0,
            }
            self.rng = random.Random(self.config.seed)
            self.faults = FaultBook(self.rng)
            if self.config.error_rate > 0:
                self.faults.add({"kind": "error500", "rate": self.config.error_rate})
            if self.config.drop_rate > 0:
                self.faults.add({"kind": "drop", "rate": self.config.drop_rate})
            for rule in self.config.faults:
                self.faults.add(dict(rule))
            self.limiter = LeakyBucket(self.config.rate, self.config.burst, time.monotonic())
            self.operating = OperatingBudget(self.config.operating_limit, self.config.operating_window)
            self.tokens = TokenStore()
            from sandbox.appmode import AppState  # here: appmode's methods import this module

            self.app = AppState()

    # -- documents -------------------------------------------------------------------------

    def visible_document(self, doc_id: int) -> dict[str, Any] | None:
        """The document if it exists and is not hidden from the webhook user."""
        if doc_id in self.permissions.hidden_document_ids:
            return None
        return self.documents.get(doc_id)

    def next_document_id(self) -> int:
        """The id a new document gets."""
        return max(self.documents, default=0) + 1

    # -- chats -----------------------------------------------------------------------------

    def private_dialog(self, user_id: int) -> Chat:
        """The private dialog between the webhook user and `user_id`, created on first use."""
        dialog_id = str(user_id)
        chat = self.chats.get(dialog_id)
        if chat is None:
            chat = Chat(dialog_id, PRIVATE_CHAT_ID_BASE + user_id, f"Dialog with user {user_id}",
                        {WEBHOOK_USER_ID, user_id})
            self.chats[dialog_id] = chat
        return chat

    def add_message(self, chat: Chat, author_id: int, text: str, attach: Any,
                    reply_id: int | None = None) -> Message:
        """Store a message and give it the next id."""
        message = Message(self.next_message_id, chat.chat_id, chat.dialog_id, author_id, text, attach,
                          time.time(), reply_id)
        self.next_message_id += 1
        self.messages.append(message)
        return message

    def message(self, message_id: int) -> Message | None:
        """A message by id."""
        return next((m for m in self.messages if m.id == message_id), None)

    # -- call log --------------------------------------------------------------------------

    def begin_call(self, method: str, auth: str, params: dict[str, Any], batch: int | None) -> dict[str, Any]:
        """Log a call as received (status filled in by `finish_call`); returns its record."""
        with self.lock:
            record = {"seq": self.next_seq, "time": time.time(), "method": method, "http_status": None,
                      "error": None, "auth": auth, "params": params, "batch": batch, "fault": None,
                      "applied": False}
            self.next_seq += 1
            self.calls.append(record)
            if batch is None:
                self.stats["requests"] += 1
            self.stats["by_method"][method] += 1
            return record

    def finish_call(self, record: dict[str, Any], generation: int, status: int | None,
                    error: str | None, fault: str | None = None, applied: bool = False) -> None:
        """Fill in the outcome of a logged call (ignored if the portal was reset meanwhile).

        `applied` means the call ran to a successful result, even if its answer was then lost.
        """
        with self.lock:
            record["http_status"] = status
            record["error"] = error
            record["fault"] = fault
            record["applied"] = applied
            if generation != self.generation:
                return
            if error:
                self.stats["by_error"][error] += 1
            if record["batch"] is None:
                self.stats["by_status"][str(status) if status is not None else "dropped"] += 1

    def public_stats(self) -> dict[str, Any]:
        """The counters as JSON."""
        with self.lock:
            return {k: dict(v) if isinstance(v, Counter) else v for k, v in self.stats.items()}
