"""Schemathesis hooks for bench/contract.py (loaded through SCHEMATHESIS_HOOKS).

The events endpoint's credential is a form field (`auth[application_token]`), which schemathesis' auth
settings cannot fill, and the robot's URL names its portal. Where a generated case carries those fields,
they get the stack's values (from the environment), so that cases reach the checks behind the credential;
a case that leaves them out still tests the refusal. Likewise a well-formed `chat` becomes one the stack's
portal allows: which chats a caller may name is configuration, which no schema can state.
"""

from __future__ import annotations

import os
import re
from typing import Any

import schemathesis

# A chat the document allows (handlers/schemas.py CHAT_PATTERN); which ones a caller may name is configuration.
GROUP_CHAT = re.compile(r"(?:chat|sg)[0-9]{1,18}")


@schemathesis.hook
def map_body(context: Any, body: Any) -> Any:
    path = context.operation.path
    if path == "/v1/cancel" and isinstance(body, dict) and isinstance(body.get("chat"), str) and \
            GROUP_CHAT.fullmatch(body["chat"]) and os.environ.get("CONTRACT_CHAT"):
        body["chat"] = os.environ["CONTRACT_CHAT"]  # a well-formed chat becomes the one the stack allows
    if path == "/v1/bitrix24/events" and isinstance(body, dict):
        for field, variable in (("auth[application_token]", "CONTRACT_APP_TOKEN"),
                                ("auth[member_id]", "CONTRACT_MEMBER_ID")):
            if field in body and os.environ.get(variable):
                body[field] = os.environ[variable]
    return body


@schemathesis.hook
def map_query(context: Any, query: Any) -> Any:
    if context.operation.path == "/v1/bitrix24/robot" and isinstance(query, dict) and "portal" in query:
        query["portal"] = os.environ.get("CONTRACT_PORTAL", query["portal"])
    return query
