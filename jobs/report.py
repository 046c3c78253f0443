"""The chat report of one request: BB-code text in the portal's language."""

from __future__ import annotations

from collections import Counter
from typing import Any

from settings import Portal

# Bitrix24 truncates chat messages past 20,000 characters; stop listing documents well before.
MESSAGE_BUDGET = 18_000

DOC_TYPES = {
    "en": {"A": "Arrival", "S": "Stock adjustment", "M": "Moving", "R": "Return", "D": "Write-off"},
    "ru": {"A": "Приход", "S": "Оприходование", "M": "Перемещение", "R": "Возврат", "D": "Списание"},
}

TEXT: dict[str, dict[str, Any]] = {
    "en": {
        "cancelled": "cancelled",
        "already_not_conducted": "already not conducted",
        "not_found": "not found",
        "refused": "refused",
        "failed": "failed",
        "pending": "not processed",
        "headline_ok": "Cancelled the conduct of inventory documents",
        "headline_partial": "Cancelling inventory documents: some need attention",
        "headline_failed": "Could not cancel inventory documents",
        "headline_event_failed": "Could not read the object of a Bitrix24 event",
        "event_failed_hint": "check that the webhook has the scope of the rule's read method and that the object "
                             "exists; the request can be replayed with rq requeue",
        "reason": "Reason",
        "source": "Source",
        "external": "external id",
        "document": "Document",
        "todo": "What to do",
        "more": "and {n} more documents: see the request status",
        "request": "Request",
        "replay": "replay",
        "refused_hint": "Check the webhook user's rights: \"Cancel conduct\" for this document type and "
                        "\"View and select warehouse\", and that inventory management is on.",
        "not_found_hint": "Check the document id or number: the webhook user cannot see such a document.",
        "sources": {"api": "API", "robot": "Business process robot", "event": "Bitrix24 event"},
        "event": "Event",
    },
    "ru": {
        "cancelled": "проведение отменено",
        "already_not_conducted": "уже не проведён",
        "not_found": "не найден",
        "refused": "отказано",
        "failed": "ошибка",
        "pending": "не обработан",
        "headline_ok": "Отменено проведение складских документов",
        "headline_partial": "Отмена проведения складских документов: нужно внимание",
        "headline_failed": "Не удалось отменить проведение складских документов",
        "headline_event_failed": "Не удалось прочитать объект события Bitrix24",
        "event_failed_hint": "проверьте, что у вебхука есть права на метод чтения из правила и что объект "
                             "существует; запрос можно повторить через rq requeue",
        "reason": "Причина",
        "source": "Источник",
        "external": "внешний id",
        "document": "Документ",
        "todo": "Что сделать",
        "more": "и ещё {n} документов: см. статус запроса",
        "request": "Запрос",
        "replay": "повтор",
        "refused_hint": "Проверьте права пользователя вебхука: «Отмена проведения» для этого типа документа и "
                        "«Просмотр и выбор склада», и что складской учёт включён.",
        "not_found_hint": "Проверьте id или номер документа: пользователь вебхука не видит такой документ.",
        "sources": {"api": "API", "robot": "Робот бизнес-процесса", "event": "Событие Bitrix24"},
        "event": "Событие",
    },
}

OBJECT_LINKS = {"crm.item.get:2": "/crm/deal/details/{id}/", "sale.shipment.get": "/shop/orders/shipment/details/{id}/"}


def marker(request_id: str, round_: int) -> str:
    """The request's tag in the chat (`#<id>`, `#<id>/<round>` for a replay): for people; it proves nothing."""
    return f"#{request_id}" if round_ <= 1 else f"#{request_id}/{round_}"


def request_line(request_id: str, round_: int, nonce: str, language: str) -> str:
    """The report's last line: the request's tag, then the round's secret nonce.

    A lookup for an unanswered post accepts a message only if it was written by the service's own user
    and ends with this exact line. The nonce is random, kept on the record and never shown by the status
    API, so no sender can put it into a reason; and a reason is never a report's last line.
    """
    t = TEXT[language]
    suffix = f" ({t['replay']} {round_})" if round_ > 1 else ""
    return f"{t['request']} {marker(request_id, round_)}{suffix} · {nonce}"


def document_url(portal: Portal, doc_id: int) -> str:
    """Where a person opens the document in the portal."""
    return f"{portal.origin}/shop/documents/details/{doc_id}/"


def render(record: dict[str, Any], portal: Portal, round_: int, nonce: str) -> str:
    """The report text for a finished request, ending with its request line (see `request_line`)."""
    t = TEXT[portal.language]
    request = record["request"]
    docs = record["documents"]
    counts = Counter(doc.get("outcome") or "pending" for doc in docs)
    good = counts["cancelled"] + counts["already_not_conducted"]
    if not docs and record.get("error"):
        headline = t["headline_event_failed"]
    elif good == len(docs):
        headline = t["headline_ok"]
    elif good == 0:
        headline = t["headline_failed"]
    else:
        headline = t["headline_partial"]
    tally = ", ".join(f"{t[name]}: {counts[name]}" for name in
                      ("cancelled", "already_not_conducted", "not_found", "refused", "failed", "pending")
                      if counts[name])
    lines = [f"[b]{headline}[/b]" + (f" ({tally})" if tally else "")]
    if not docs and record.get("error"):
        lines.append(f"{_plain(record['error'])}. {t['todo']}: {t['event_failed_hint']}")
    if request.get("reason"):
        lines.append(f"[b]{t['reason']}:[/b] {_plain(request['reason'])}")
    lines.append(f"[b]{t['source']}:[/b] {_source(request, record, portal, t)}")
    lines.append("")
    used = sum(len(line) for line in lines)
    for index, doc in enumerate(docs):
        line = _document_line(doc, portal, t)
        if used + len(line) > MESSAGE_BUDGET:
            lines.append(str(t["more"]).format(n=len(docs) - index))
            break
        lines.append(line)
        used += len(line) + 1
    lines.append("")
    lines.append(request_line(record["id"], round_, nonce, portal.language))
    return "\n".join(lines)


def _document_line(doc: dict[str, Any], portal: Portal, t: dict[str, Any]) -> str:
    outcome = doc.get("outcome") or "pending"
    if doc.get("id"):
        label = f"#{doc['id']}"
        if doc.get("title"):
            label += f" {_plain(doc['title'])}"
        name = f"[url={document_url(portal, int(doc['id']))}]{label}[/url]"
    else:
        name = f"{t['document']} {_plain(str(doc.get('number')))}"
    kind = DOC_TYPES[portal.language].get(doc.get("docType") or "", "")
    line = f"• {name}" + (f" ({kind})" if kind else "") + f": [b]{t[outcome]}[/b]"
    if outcome in ("not_found", "refused", "failed") and doc.get("detail"):
        line += f". {_plain(doc['detail'])}"
    if outcome == "refused":
        line += f" {t['todo']}: {t['refused_hint']}"
    elif outcome == "not_found":
        line += f" {t['todo']}: {t['not_found_hint']}"
    elif outcome == "failed" and doc.get("advice"):
        line += f" {t['todo']}: {_plain(doc['advice'])}"
    return line


def _source(request: dict[str, Any], record: dict[str, Any], portal: Portal, t: dict[str, Any]) -> str:
    source = t["sources"].get(request.get("source"), request.get("source") or "?")
    parts = [source]
    if request.get("external_id"):
        parts.append(f"{t['external']} {_plain(request['external_id'])}")
    if request.get("source_ref"):
        parts.append(_plain(request["source_ref"]))
    resolution = record.get("resolution") or {}
    if resolution.get("event"):
        obj = resolution.get("object_id")
        path = OBJECT_LINKS.get(resolution.get("link_key", ""))
        ref = f"{resolution['event']} {obj}"
        if path and obj is not None:
            ref = f"[url={portal.origin}{path.format(id=obj)}]{ref}[/url]"
        parts.append(ref)
    return ", ".join(parts)


def _plain(text: Any) -> str:
    """Text from outside, with BB-code brackets neutralised so it cannot restyle the report."""
    return str(text).replace("[", "(").replace("]", ")")
