"""The API's contract: pydantic models of every request and response body.

They decide what a valid `POST /v1/cancel` body is (handlers/intake.py turns their first error into our
`{"error", "message", "field"}` answer) and they are what the OpenAPI document (handlers/openapi.py) is
built from, so the document and the behaviour cannot drift apart. Checks that need the configuration (is
this portal or chat one the caller may use?) stay in the handlers, after the model.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictStr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from jobs.policy import MAX_DOCUMENTS

# Longest reason / external id / number we store and show; longer ones are refused, not cut.
MAX_REASON = 1000
MAX_REFERENCE = 200
# Bitrix24 ids are 32-bit signed integers in its database.
MAX_DOCUMENT_ID = 2**31 - 1
# Portal names are short identifiers from the configuration.
MAX_PORTAL_NAME = 100
# A chat a request may name: chat42 (a group chat) or sg42 (a collab); never a bare user id (a person's dialog).
CHAT_PATTERN = r"^(?:chat|sg)[0-9]{1,18}$"

def _whole(value: Any) -> Any:
    """A JSON number with no fraction (142.0) is the integer JSON Schema says it is; 1.5, "2" and true are not."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


DocumentId = Annotated[Annotated[int, Field(strict=True, gt=0, le=MAX_DOCUMENT_ID)], BeforeValidator(_whole),
                       Field(description="An inventory document's id")]
# JSON's own whitespace only: Python's str.strip() and the regex engines disagree about the rest (U+0085).
JSON_SPACE = " \t\r\n"
# A document number: at most 200 characters, with something besides spaces; surrounding spaces are dropped.
DocumentNumber = Annotated[StrictStr, StringConstraints(max_length=MAX_REFERENCE, pattern=r"[^ \t\r\n]"),
                           AfterValidator(lambda value: value.strip(JSON_SPACE))]
Outcome = Literal["cancelled", "already_not_conducted", "refused", "not_found", "failed"]
State = Literal["queued", "running", "retrying", "done", "failed"]


def _never_null(schema: dict[str, Any]) -> None:
    """A field that may be left out but is never null: the document says "an array, when given"."""
    branches = schema.pop("anyOf", [])
    schema.update(next((branch for branch in branches if branch.get("type") != "null"), {}))
    schema.pop("default", None)


class CancelBody(BaseModel):
    """What `POST /v1/cancel` takes: the documents (by id or by number), why, and where to report."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"oneOf": [{"required": ["document_ids"]}, {"required": ["document_numbers"]}],
                           "examples": [
            {"document_ids": [142, 143], "reason": "Shipment RMA-1 returned", "external_id": "RMA-1"},
            {"portal": "shop", "document_numbers": ["W-0001"], "reason": "Pallet 7 scanned back in",
             "chat": "chat7"},
        ]},
    )

    portal: Annotated[StrictStr, StringConstraints(min_length=1, max_length=MAX_PORTAL_NAME)] | None = Field(
        None, description="The portal's name; may be left out when the caller may use one portal only")
    # The lists are optional but never null: exactly one is given (see one_list and the document's oneOf).
    document_ids: Annotated[list[DocumentId], Field(min_length=1, max_length=MAX_DOCUMENTS,
                                                    json_schema_extra={"uniqueItems": True})] | None = Field(
        None, description=f"Distinct document ids (1-{MAX_DOCUMENTS}); give these or document_numbers",
        json_schema_extra=_never_null)
    document_numbers: Annotated[list[DocumentNumber], Field(min_length=1, max_length=MAX_DOCUMENTS,
                                                            json_schema_extra={"uniqueItems": True})] | None = Field(
        None, description=f"Distinct document numbers (1-{MAX_DOCUMENTS}), looked up on the portal",
        json_schema_extra=_never_null)
    reason: Annotated[StrictStr, StringConstraints(max_length=MAX_REASON)] | None = Field(
        None, description="Why, shown in the chat report")
    external_id: Annotated[StrictStr, StringConstraints(max_length=MAX_REFERENCE)] | None = Field(
        None, description="The sender's own reference (an RMA or shipment number), shown in the report")
    chat: Annotated[StrictStr, StringConstraints(pattern=CHAT_PATTERN)] | None = Field(
        None, description="Report to this group chat instead of the portal's (chat42): the portal's own, or one "
                          "the portal's or the caller's `chats` list names")

    @field_validator("document_ids", "document_numbers", mode="before")
    @classmethod
    def not_null(cls, value: Any) -> Any:
        if value is None:  # only an explicit null gets here: an absent field keeps its default
            raise PydanticCustomError("list_type", "input should be a valid array (leave the field out instead)")
        return value

    @field_validator("document_ids", "document_numbers")
    @classmethod
    def distinct(cls, value: list[Any] | None) -> list[Any] | None:
        if value is not None and len(set(value)) != len(value):
            raise PydanticCustomError("duplicates", "contains duplicates")
        return value

    @model_validator(mode="after")
    def one_list(self) -> CancelBody:
        if self.document_ids is not None and self.document_numbers is not None:
            raise PydanticCustomError("document_choice", "give document_ids or document_numbers, not both")
        if self.document_ids is None and self.document_numbers is None:
            raise PydanticCustomError("document_choice", "document_ids (or document_numbers) is required: a "
                                                         "non-empty list of document ids")
        return self


def first_error(exc: ValidationError) -> tuple[str, str | None]:
    """Our message and field for a model's first error (the field is the body's top-level key)."""
    error = exc.errors(include_url=False, include_context=False, include_input=False)[0]
    kind, loc, text = error["type"], error["loc"], error["msg"]
    if kind == "json_invalid":
        if "recursion" in text.lower():
            return "the JSON body is nested too deeply", None
        return f"malformed JSON body ({text})", None
    if kind in ("model_type", "model_attributes_type", "dict_type") and not loc:
        return "the body must be a JSON object", None
    if not loc:  # a check across fields (document_choice)
        return text, "document_ids"
    field = str(loc[0])
    if kind == "extra_forbidden":
        return f"unknown field {field!r}", field
    path = field + "".join(f"[{part}]" for part in loc[1:] if isinstance(part, int))
    if kind == "string_pattern_mismatch" and field == "document_numbers":
        text = "must not be empty or only spaces"
    if kind == "string_pattern_mismatch" and field == "chat":
        text = "must be a group chat (chat42 or sg42); a request may not name a person's dialog"
    return f"{path}: {text[:1].lower()}{text[1:]}", field


# -- answers ---------------------------------------------------------------------------------------

class ErrorBody(BaseModel):
    """Every refusal: a stable code, a sentence for a person, and the body field at fault when there is one."""

    error: str = Field(description="invalid_request, unauthorized, forbidden, not_found, method_not_allowed, "
                                   "too_large, uri_too_long, unsupported_media_type, idempotency_key_reused, "
                                   "unavailable or internal_error", examples=["invalid_request"])
    message: str = Field(examples=["document_ids[1]: input should be a valid integer"])
    field: str | None = Field(None, examples=["document_ids"])


class Accepted(BaseModel):
    """A request was accepted (202), or a repeat of one was recognised (200, `duplicate`)."""

    request_id: str = Field(pattern=r"^[0-9a-f]{32}$", examples=["4f1c2b7a9d0e4c3b8a6f5e2d1c0b9a87"])
    status_url: str = Field(examples=["/v1/requests/4f1c2b7a9d0e4c3b8a6f5e2d1c0b9a87"])
    duplicate: bool | None = Field(None, description="present and true on a repeat: nothing new was done")


class EventAnswer(BaseModel):
    """What the events endpoint answers Bitrix24 (always 200 when the event was authentic and well formed)."""

    request_id: str | None = None
    status_url: str | None = None
    duplicate: bool | None = None
    status: Literal["ignored", "pull requested", "pull already waiting"] | None = Field(
        None, description="`ignored`: no rule of the portal names this event; for ONOFFLINEEVENT, whether a pull of "
                          "the portal's offline queue was enqueued or one is already waiting")
    message: str | None = None


class DocumentView(BaseModel):
    id: int | None = None
    number: str | None = None
    outcome: Outcome | None = Field(None, description="null until decided")
    detail: str | None = None
    title: str | None = None
    docType: str | None = None


class RequestView(BaseModel):
    """A request's record as `GET /v1/requests/{id}` shows it (times in ISO 8601 UTC)."""

    request_id: str
    state: State
    portal: str | None
    source: str | None = Field(description="api (the operator's command too), robot or event")
    caller: str | None = Field(description="the caller that sent it; null for Bitrix24's own senders")
    source_ref: str | None
    reason: str | None
    external_id: str | None
    documents: list[DocumentView]
    message_id: int | None = Field(description="the chat report's message id once posted")
    attempts: int
    created_at: str | None
    updated_at: str | None
    finished_at: str | None
    resume_at: str | None = None
    waiting_for: str | None = None
    error: str | None = None
    report_error: str | None = None
    resolution: Any = None


class HeldBack(BaseModel):
    paused_methods: dict[str, str | None]
    slowed_until: str | None


class OfflineQueue(BaseModel):
    """An installed portal's offline event queue, as the puller saw it (jobs/offline.py)."""

    mode: Literal["reserve", "clear"]
    last_pull_at: str | None
    pulled: int
    confirmed: int
    requests: int
    ignored: int
    unanswered_reads: int
    waiting_in_stash: int
    last_error: str | None


class PortalView(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    rules: int
    held_back: HeldBack | None
    offline: OfflineQueue | None = None


class PortalList(BaseModel):
    portals: list[PortalView]


class Status(BaseModel):
    status: Literal["ok", "ready"]


class HealthDetails(BaseModel):
    status: Literal["ready"]
    redis: Literal["ok"]
    workers: int
    queue_depth: dict[str, int]
    portals_held_back: dict[str, HeldBack]
    offline_queues: dict[str, OfflineQueue]


# -- what Bitrix24 sends (form-encoded, PHP-style keys) ------------------------------------------------

class RobotQuery(BaseModel):
    """The *Webhook* robot's URL: the portal, its secret and what to cancel."""

    portal: str = Field(description="the portal's name")
    key: str = Field(description="the portal's robot secret (robot_secret)")
    document_ids: str | None = Field(None, pattern=r"^ *[0-9]{1,10} *(?:, *[0-9]{1,10} *)*,? *$",
                                     description="distinct ids separated by commas",
                                     examples=["142,143"])
    document_numbers: str | None = Field(None, description="numbers separated by commas")
    reason: str | None = Field(None, max_length=MAX_REASON)
    external_id: str | None = Field(None, max_length=MAX_REFERENCE)
    chat: str | None = Field(None, pattern=CHAT_PATTERN)
    run: str | None = Field(None, max_length=200, description="makes a repeated robot run a new request")


RobotForm = {
    "type": "object",
    "description": "What the robot posts (all optional): the workflow's document and ids, and, for an app, "
                   "its fresh tokens.",
    "properties": {
        "document_id[]": {"type": "array", "items": {"type": "string", "maxLength": 200}, "maxItems": 3,
                          "examples": [["crm", "CCrmDocumentDeal", "DEAL_12"]]},
        "workflow_id": {"type": "string", "maxLength": 200},
        "ts": {"type": "string", "maxLength": 200},
        "auth[application_token]": {"type": "string"},
        "auth[access_token]": {"type": "string"},
        "auth[refresh_token]": {"type": "string"},
        "auth[member_id]": {"type": "string"},
    },
}

EventForm = {
    "type": "object",
    "description": "A Bitrix24 outgoing event. `auth[application_token]` is the portal's application token "
                   "(compared in constant time): it is this endpoint's credential, sent in the form. "
                   "`ONOFFLINEEVENT` (an installed portal's offline queue has new records) carries `data[type]`, "
                   "`data[event]`, `data[handler]` and `data[minTimeout]` instead of `data[FIELDS][ID]`, which "
                   "every other event needs.",
    "required": ["event", "ts", "auth[member_id]", "auth[application_token]"],
    "if": {"properties": {"event": {"const": "ONOFFLINEEVENT"}}},
    "then": {"required": ["data[type]", "data[event]"]},
    "else": {"required": ["data[FIELDS][ID]"]},
    "properties": {
        "event": {"type": "string", "pattern": "^[A-Za-z0-9_.]{1,100}$", "examples": ["ONCRMDEALUPDATE"],
                  "description": "the event's name (case does not matter)"},
        "data[FIELDS][ID]": {"type": "string", "pattern": "^[0-9]{1,18}$", "examples": ["12"]},
        "data[type]": {"type": "string", "examples": ["add"], "description": "ONOFFLINEEVENT only"},
        "data[event]": {"type": "string", "examples": ["ONCRMDEALUPDATE"], "description": "ONOFFLINEEVENT only"},
        "data[handler]": {"type": "string", "description": "ONOFFLINEEVENT only"},
        "data[minTimeout]": {"type": "string", "description": "ONOFFLINEEVENT only"},
        "ts": {"type": "string", "pattern": "^[0-9]{1,12}$", "examples": ["1764672000"]},
        "event_handler_id": {"type": "string", "maxLength": 32},
        "auth[domain]": {"type": "string", "examples": ["example.bitrix24.com"]},
        "auth[member_id]": {"type": "string"},
        "auth[application_token]": {"type": "string"},
        "auth[access_token]": {"type": "string"},
        "auth[refresh_token]": {"type": "string"},
    },
}


AppInstallForm = {
    "type": "object",
    "description": "ONAPPINSTALL (auth with the installing user's tokens) or ONAPPUNINSTALL (auth without tokens).",
    "required": ["event", "auth[member_id]", "auth[application_token]"],
    "properties": {
        "event": {"type": "string", "enum": ["ONAPPINSTALL", "ONAPPUNINSTALL"]},
        "data[LANGUAGE_ID]": {"type": "string"},
        "ts": {"type": "string", "pattern": "^[0-9]{1,12}$"},
        "auth[domain]": {"type": "string", "examples": ["example.bitrix24.com"]},
        "auth[client_endpoint]": {"type": "string", "examples": ["https://example.bitrix24.com/rest/"]},
        "auth[member_id]": {"type": "string"},
        "auth[application_token]": {"type": "string"},
        "auth[access_token]": {"type": "string"},
        "auth[refresh_token]": {"type": "string"},
    },
}

AppRobotForm = {
    "type": "object",
    "description": "The robot's call from a workflow (USE_SUBSCRIPTION=Y).",
    "required": ["event_token", "auth[member_id]", "auth[application_token]"],
    "properties": {
        "event_token": {"type": "string", "maxLength": 500},
        "workflow_id": {"type": "string", "maxLength": 500},
        "code": {"type": "string"},
        "document_id[0]": {"type": "string"}, "document_id[1]": {"type": "string"},
        "document_id[2]": {"type": "string"},
        "properties[document_ids]": {"type": "string", "description": "ids, also as properties[document_ids][0]..."},
        "properties[document_numbers]": {"type": "string"},
        "properties[reason]": {"type": "string"},
        "properties[chat]": {"type": "string", "description": "chat42, or none for no chat report"},
        "auth[domain]": {"type": "string"},
        "auth[member_id]": {"type": "string"},
        "auth[application_token]": {"type": "string"},
        "auth[access_token]": {"type": "string"},
    },
}
