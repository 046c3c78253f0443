"""The chat report of one request: BB-code text in the portal's language.

The texts are gettext messages (English ids, catalogs in jobs/locale, see jobs/i18n.py). A report reads:

    [b]Headline[/b] ([color=#1a7f37]cancelled: 2[/color], [color=#d32f2f]refused: 1[/color])
    [b]Reason:[/b] ...
    [b]Source:[/b] ...

    • [url=...]#5 Title[/url] (Stock adjustment): [b][color=#d32f2f]refused[/color][/b]
        Bitrix24 answered: <the portal's words, as one sentence>
        What to do: <our advice>
        Responsible: [user=7]user 7[/user]

    Request #<id> · <nonce>

Each part of a document sits on a line of its own (Bitrix24 shows four spaces as a tab) and ends as a
sentence, whatever punctuation the portal's text came with. Only BB codes the Bitrix24 docs list are used:
[b], [color=#hex], [url=...], [user=ID].
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from typing import Any

from jobs.details import OWN_DETAILS, UNANSWERED, translated
from jobs.i18n import N_, catalog
from settings import Portal

# Bitrix24 truncates chat messages past 20,000 characters; stop listing documents well before.
MESSAGE_BUDGET = 18_000
# Bitrix24 shows four spaces at a line's start as a tab: a document's details sit under its line.
INDENT = "    "

OUTCOMES = ("cancelled", "already_not_conducted", "not_found", "refused", "failed", "pending")
OUTCOME_NAMES = {
    "cancelled": N_("cancelled"),
    "already_not_conducted": N_("already not conducted"),
    "not_found": N_("not found"),
    "refused": N_("refused"),
    "failed": N_("failed"),
    "pending": N_("not processed"),
}
GREEN, RED, GREY = "#1a7f37", "#d32f2f", "#808080"
COLOURS = {"cancelled": GREEN, "already_not_conducted": GREY, "not_found": GREY, "refused": RED, "failed": RED,
           "pending": GREY}
# The outcomes a person must act on: the document's responsible user is mentioned (portal setting `mention`).
NEEDS_A_PERSON = ("refused", "failed")

# Inventory document types as the Bitrix24 interface names them.
DOC_TYPES = {"A": N_("Arrival"), "S": N_("Stock adjustment"), "M": N_("Moving"), "R": N_("Return"),
             "D": N_("Write-off")}
SOURCES = {"robot": N_("Business process robot"), "event": N_("Bitrix24 event")}

REFUSED_HINT = N_("Check the webhook user's rights: \"Cancel conduct\" for this document type and \"View and "
                  "select warehouse\", and that inventory management is on.")
NOT_FOUND_HINT = N_("Check the document id or number: the webhook user cannot see such a document.")
EVENT_FAILED_HINT = N_("Check that the webhook has the scope of the rule's read method and that the object "
                       "exists, then replay the request.")

OBJECT_LINKS = {"crm.item.get:2": "/crm/deal/details/{id}/", "sale.shipment.get": "/shop/orders/shipment/details/{id}/"}

# A text ends as a sentence when it ends with one of these, maybe followed by closing quotes or brackets.
_SENTENCE_END = re.compile(r"[.!?…](?:[\"'»”’)]|&quot;)*$")
_TRAILING = " \t:;,-–—"


def marker(request_id: str, round_: int) -> str:
    """The request's tag in the chat (`#<id>`, `#<id>/<round>` for a replay): for people; it proves nothing."""
    return f"#{request_id}" if round_ <= 1 else f"#{request_id}/{round_}"


def request_line(request_id: str, round_: int, nonce: str, language: str) -> str:
    """The report's last line: the request's tag, then the round's secret nonce.

    A lookup for an unanswered post accepts a message only if it was written by the service's own user
    and ends with this exact line. The nonce is random, kept on the record and never shown by the status
    API, so no sender can put it into a reason; and a reason is never a report's last line.
    """
    _ = catalog(language).gettext
    suffix = " (" + _("replay {round}").format(round=round_) + ")" if round_ > 1 else ""
    label = _("Request")
    return f"{label} {marker(request_id, round_)}{suffix} · {nonce}"


def document_url(portal: Portal, doc_id: int) -> str:
    """Where a person opens the document in the portal."""
    return f"{portal.origin}/shop/documents/details/{doc_id}/"


def sentence(text: str) -> str:
    """The text as one sentence: trailing separators dropped, a full stop added unless it already ends one."""
    text = " ".join(text.split()).rstrip(_TRAILING)
    if not text or _SENTENCE_END.search(text):
        return text
    return text + "."


def render(record: dict[str, Any], portal: Portal, round_: int, nonce: str) -> str:
    """The report text for a finished request, ending with its request line (see `request_line`)."""
    _ = catalog(portal.language).gettext
    request = record["request"]
    docs = record["documents"]
    counts = Counter(doc.get("outcome") or "pending" for doc in docs)
    good = counts["cancelled"] + counts["already_not_conducted"]
    event_failed = not docs and bool(record.get("error"))
    if event_failed:
        headline = _("Could not read the object of a Bitrix24 event")
    elif good == len(docs):
        headline = _("Cancelled the conduct of inventory documents")
    elif good == 0:
        headline = _("Could not cancel inventory documents")
    else:
        headline = _("Cancelling inventory documents: some need attention")
    tally = ", ".join(f"[color={COLOURS[name]}]{_(OUTCOME_NAMES[name])}: {counts[name]}[/color]"
                      for name in OUTCOMES if counts[name])
    lines = [f"[b]{headline}[/b]" + (f" ({tally})" if tally else "")]
    if event_failed:
        error, todo = _("Error"), _("What to do")
        said = translated(str(record["error"]), _)
        lines.append(f"{error}: {sentence(_capital(said) if said is not None else _plain(record['error']))}")
        lines.append(f"{todo}: {_(EVENT_FAILED_HINT)}")
    if request.get("reason"):
        reason = _("Reason")
        lines.append(f"[b]{reason}:[/b] {_plain(request['reason'])}")
    source = _("Source")
    lines.append(f"[b]{source}:[/b] {_source(request, record, portal, _)}")
    lines.append("")
    used = sum(len(line) + 1 for line in lines)
    for index, doc in enumerate(docs):
        block = "\n".join(document_lines(doc, portal, _))
        if used + len(block) > MESSAGE_BUDGET:
            left = len(docs) - index
            lines.append(catalog(portal.language).ngettext(
                "and {n} more document: see the request status", "and {n} more documents: see the request status",
                left).format(n=left))
            break
        lines.append(block)
        used += len(block) + 1
    lines.append("")
    lines.append(request_line(record["id"], round_, nonce, portal.language))
    return "\n".join(lines)


def document_lines(doc: dict[str, Any], portal: Portal, _: Callable[[str], str]) -> list[str]:
    """A document's line, then one line per detail: the portal's words, our advice, who must act."""
    outcome = doc.get("outcome") or "pending"
    if doc.get("id"):
        label = f"#{doc['id']}"
        if doc.get("title"):
            label += f" {_plain(doc['title'])}"
        name = f"[url={document_url(portal, int(doc['id']))}]{label}[/url]"
    else:
        name = _("Document") + f" {_plain(str(doc.get('number')))}"
    kind = DOC_TYPES.get(doc.get("docType") or "")
    lines = [f"• {name}" + (f" ({_(kind)})" if kind else "")
             + f": [b][color={COLOURS[outcome]}]{_(OUTCOME_NAMES[outcome])}[/color][/b]"]
    detail = str(doc.get("detail") or "")
    if outcome in ("not_found", "refused") and detail and detail not in OWN_DETAILS:
        lines.append(INDENT + _("Bitrix24 answered") + f": {sentence(_plain(detail))}")
    elif outcome == "failed" and detail:
        said, unanswered = _split_unanswered(detail)
        ours = translated(said, _)
        text = _capital(_plain(ours)) if ours is not None else _plain(said)
        lines.append(INDENT + _("Error") + f": {sentence(text)}")
        if unanswered:
            lines.append(f"{INDENT}{sentence(_capital(_(UNANSWERED)))}")
    hint = {"refused": _(REFUSED_HINT), "not_found": _(NOT_FOUND_HINT)}.get(outcome)
    if outcome == "failed" and doc.get("advice"):
        hint = _(str(doc["advice"]))  # our advice by error code (bitrix24/errors.py), translated
    if hint:
        lines.append(INDENT + _("What to do") + f": {sentence(hint)}")
    responsible = doc.get("responsibleId")
    if portal.mention == "responsible" and outcome in NEEDS_A_PERSON and isinstance(responsible, int):
        # Bitrix24 shows a mention as the user's name; the text inside names them where it cannot
        who = _("user {id}").format(id=responsible)
        lines.append(INDENT + _("Responsible") + f": [user={responsible}]{who}[/user]")
    return lines


def _split_unanswered(detail: str) -> tuple[str, bool]:
    """A failed document's detail without the note that its last cancel got no answer (and whether it had it)."""
    note = f" ({UNANSWERED})"
    return (detail[:-len(note)], True) if detail.endswith(note) else (detail, False)


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _source(request: dict[str, Any], record: dict[str, Any], portal: Portal, _: Callable[[str], str]) -> str:
    source = request.get("source") or "?"
    parts = [_(SOURCES[source]) if source in SOURCES else "API" if source == "api" else _plain(source)]
    if request.get("external_id"):
        parts.append(_("external id") + f" {_plain(request['external_id'])}")
    if request.get("source_ref"):
        parts.append(_plain(request["source_ref"]))
    resolution = record.get("resolution") or {}
    if resolution.get("event"):
        obj = resolution.get("object_id")
        path = OBJECT_LINKS.get(resolution.get("link_key", ""))
        ref = f"{_plain(resolution['event'])} {_plain(obj)}"
        if path and obj is not None:
            ref = f"[url={portal.origin}{path.format(id=obj)}]{ref}[/url]"
        parts.append(ref)
    return ", ".join(parts)


def _plain(text: Any) -> str:
    """Text from outside on one line, with BB-code brackets neutralised so it cannot restyle the report."""
    return " ".join(str(text).replace("[", "(").replace("]", ")").split())
