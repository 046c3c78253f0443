"""The web page a person opens at `/`: documents, chats as conversations and the latest failed calls."""

from __future__ import annotations

import html
import json
import re
from typing import Any

from flask import Blueprint, Response, current_app

from sandbox.state import Portal, portal_date

bp = Blueprint("page", __name__)

# The page reloads itself this often so a person sees the service at work.
REFRESH_SECONDS = 2
# How many failed calls the page lists.
OFFLINE_ROWS_SHOWN = 100
FAILED_CALLS_SHOWN = 20

STATUS_NAMES = {"Y": "conducted", "N": "draft", "C": "cancelled"}

_SIMPLE_TAGS = re.compile(r"\[(/?)(b|i|u|s)\]", re.IGNORECASE)
# [color=#hex]: 3 or 6 hex digits, as the Bitrix24 docs allow; anything else stays as text.
_COLOR = re.compile(r"\[color=(#[0-9a-f]{3}|#[0-9a-f]{6})\](.*?)\[/color\]", re.IGNORECASE | re.DOTALL)
_URL_WITH_TARGET = re.compile(r"\[url=([^\]]+)\](.*?)\[/url\]", re.IGNORECASE | re.DOTALL)
_URL_PLAIN = re.compile(r"\[url\](.*?)\[/url\]", re.IGNORECASE | re.DOTALL)
_USER = re.compile(r"\[user=(\w+)\](.*?)\[/user\]", re.IGNORECASE | re.DOTALL)
_BREAK = re.compile(r"\[br\]", re.IGNORECASE)


def _link(target: str, label: str) -> str:
    # `target` is already HTML-escaped; only web links become anchors.
    if re.match(r"https?://", target, re.IGNORECASE):
        return f'<a href="{target}" rel="noreferrer">{label}</a>'
    return label


def render_bbcode(source: str, users: dict[int, dict[str, Any]] | None = None) -> str:
    """Escape the text, then turn the BB codes a report uses into HTML the way Bitrix24's chat shows them.

    [b], [i], [u], [s], [color=#hex], [url], [br]; a mention [user=ID]…[/user] shows the user's name (the
    text inside only for a user the portal does not know); four spaces at a line's start show as a tab.
    """
    users = users or {}

    def mention(match: re.Match[str]) -> str:
        user = users.get(int(match.group(1))) if match.group(1).isdigit() else None
        name = html.escape(str(user["name"])) if user else match.group(2)
        return f'<b class="mention">@{name}</b>'

    out = html.escape(source)
    out = _SIMPLE_TAGS.sub(lambda m: f"<{m.group(1)}{m.group(2).lower()}>", out)
    for _ in range(3):  # nested colours
        out = _COLOR.sub(lambda m: f'<span style="color:{m.group(1)}">{m.group(2)}</span>', out)
    out = _URL_WITH_TARGET.sub(lambda m: _link(m.group(1), m.group(2)), out)
    out = _URL_PLAIN.sub(lambda m: _link(m.group(1), m.group(1)), out)
    out = _USER.sub(mention, out)
    out = _BREAK.sub("<br>", out)
    out = re.sub(r"(?m)^    ", '<span class="tab"></span>', out)
    return out.replace("\n", "<br>")


def _attachment_note(attach: Any) -> str:
    if attach is None:
        return ""
    summary = json.dumps(attach, ensure_ascii=False)
    if len(summary) > 200:
        summary = summary[:200] + "…"
    return f'<div class="attach">attachment: {html.escape(summary)}</div>'


def _thread(portal: Portal, messages: list[Any]) -> list[str]:
    """A chat's messages as HTML, each reply shown under the message it replies to."""
    ids = {m.id for m in messages}
    replies: dict[int, list[Any]] = {}
    for message in messages:
        if message.reply_id in ids:
            replies.setdefault(message.reply_id, []).append(message)

    def show(message: Any) -> str:
        author = portal.users.get(message.author_id, {}).get("name", f"user {message.author_id}")
        under = "".join(show(reply) for reply in replies.get(message.id, []))
        note = f' <span class="when">reply to #{message.reply_id}</span>' if message.reply_id else ""
        return (f'<div class="msg" id="m{message.id}"><span class="who">{html.escape(author)}</span> '
                f'<span class="when">#{message.id} · {portal_date(message.date)}</span>{note}'
                f"<div>{render_bbcode(message.text, portal.users)}</div>{_attachment_note(message.attach)}"
                + (f'<div class="replies">{under}</div>' if under else "") + "</div>")

    return [show(m) for m in messages if m.reply_id not in ids]


def render(portal: Portal) -> str:
    """The whole page as HTML (call with the portal lock held)."""
    config = portal.config
    hidden = portal.permissions.hidden_document_ids
    rows = []
    for doc_id, doc in sorted(portal.documents.items()):
        status = str(doc.get("status"))
        flag = " (hidden)" if doc_id in hidden else ""
        rows.append(
            f"<tr><td>{doc_id}</td><td>{html.escape(str(doc.get('docNumber')))}</td>"
            f"<td>{html.escape(str(doc.get('docType')))}</td>"
            f"<td>{html.escape(str(doc.get('title')))}{flag}</td>"
            f'<td class="st-{html.escape(status)}">{html.escape(status)} '
            f"{STATUS_NAMES.get(status, '')}</td><td>{html.escape(str(doc.get('dateModify')))}</td></tr>")
    chats = []
    for chat in portal.chats.values():
        lines = _thread(portal, [m for m in portal.messages if m.chat_id == chat.chat_id])
        members = ", ".join(str(m) for m in sorted(chat.members))
        chats.append(f"<h3>{html.escape(chat.title)} <small>({html.escape(chat.dialog_id)}; "
                     f"members {members})</small></h3>" + ("".join(lines) or "<p><i>no messages</i></p>"))
    app = portal.app
    flows = "".join(
        f"<tr><td>{html.escape(w.workflow_id)}</td><td>{html.escape(w.code)}</td>"
        f"<td>{html.escape(', '.join(w.document_id))}</td>"
        f"<td>{html.escape(json.dumps(w.properties, ensure_ascii=False))}</td>"
        f"<td>{html.escape(json.dumps(w.returned, ensure_ascii=False)) if w.returned is not None else '<i>waiting</i>'}"
        f"</td></tr>" for w in reversed(app.workflows))
    app_line = (f"installed ({len(app.bindings)} handlers bound, robots: {html.escape(', '.join(app.robots) or 'none')})"
                if app.installed else "not installed")
    offline_rows = "".join(
        f"<tr><td>{r['ID']}</td><td>{portal_date(r['TIMESTAMP_X'])}</td><td>{html.escape(r['EVENT_NAME'])}</td>"
        f"<td>{html.escape(json.dumps(r['EVENT_DATA'], ensure_ascii=False))}</td>"
        f"<td>{html.escape(r['MESSAGE_ID'])}</td><td>{html.escape(r['PROCESS_ID'] or 'waiting')}</td>"
        f"<td>{'yes' if r['ERROR'] else ''}</td></tr>" for r in app.offline[:OFFLINE_ROWS_SHOWN])
    offline_line = (f"{len(app.offline)} records, {len({r['PROCESS_ID'] for r in app.offline if r['PROCESS_ID']})} "
                    f"reserved batches; reserve/confirm (rest_offline_extended) "
                    f"{'on' if config.offline_reserve else 'off'}; {len(app.notices)} ONOFFLINEEVENT notices sent")
    failed = [c for c in portal.calls if c["http_status"] not in (200, None) or c["fault"]]
    failed = failed[-FAILED_CALLS_SHOWN:]
    call_rows = "".join(
        f"<tr><td>{c['seq']}</td><td>{portal_date(c['time'])}</td><td>{html.escape(c['method'])}</td>"
        f"<td>{c['http_status'] if c['http_status'] is not None else 'no answer'}</td>"
        f"<td>{html.escape(str(c['error'] or ''))}</td><td>{html.escape(str(c['fault'] or ''))}</td></tr>"
        for c in reversed(failed))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<title>Sandbox portal</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; font-size: 14px; }}
.st-Y {{ color: #1a7f37; }} .st-C, .st-N {{ color: #b35900; }}
.msg {{ border-left: 3px solid #2fa4e7; margin: 6px 0; padding: 4px 10px; background: #f5fafd; }}
.who {{ font-weight: bold; }} .when, small {{ color: #777; font-size: 12px; }}
.attach {{ color: #555; font-size: 12px; }}
.replies {{ margin-left: 1.5em; }} .mention {{ color: #2067b0; }} .tab {{ display: inline-block; width: 2em; }}
</style></head><body>
<h1>Sandbox portal</h1>
<p>Webhook: <code>{html.escape(config.webhook_url)}</code> &middot; plan {html.escape(config.plan)}
({config.rate:g}/s, burst {config.burst}) &middot; language {html.escape(config.language)}
&middot; cancel sets status {html.escape(config.cancelled_status)}</p>
<h2>Documents</h2>
<table><tr><th>id</th><th>docNumber</th><th>type</th><th>title</th><th>status</th><th>modified</th></tr>
{''.join(rows)}</table>
<h2>Chats</h2>
{''.join(chats)}
<h2>App and workflows</h2>
<p>App: {app_line}</p>
<table><tr><th>workflow</th><th>robot</th><th>document</th><th>properties</th><th>returned</th></tr>
{flows or '<tr><td colspan="5"><i>no workflow has run a robot</i></td></tr>'}</table>
<h2>Offline event queue</h2>
<p>{offline_line}</p>
<table><tr><th>ID</th><th>time</th><th>event</th><th>data</th><th>MESSAGE_ID</th><th>process_id</th><th>error</th></tr>
{offline_rows or '<tr><td colspan="7"><i>empty</i></td></tr>'}</table>
<h2>Latest failed calls</h2>
<table><tr><th>seq</th><th>time</th><th>method</th><th>HTTP</th><th>error</th><th>fault</th></tr>
{call_rows or '<tr><td colspan="6"><i>none</i></td></tr>'}</table>
</body></html>
"""


@bp.get("/")
def index() -> Response:
    """The human-readable page, refreshed every 2 s."""
    portal: Portal = current_app.config["PORTAL"]
    with portal.lock:
        page = render(portal)
    return Response(page, mimetype="text/html")
