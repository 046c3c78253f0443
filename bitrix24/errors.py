"""One exception type for every Bitrix24 answer that is not a success, classified by code, never by text."""

from __future__ import annotations

from dataclasses import dataclass

# Codes the portal refuses before running the method: safe to send again.
RATE_LIMITED = "QUERY_LIMIT_EXCEEDED"
OPERATING_LIMITED = "OPERATION_TIME_LIMIT"
EXPIRED_TOKEN = "expired_token"
# catalog.* business errors come back as HTTP 400 with the code "0" and a localized description.
BUSINESS = "0"
# Our own codes for failures that never got a Bitrix24 answer.
TRANSPORT_CONNECT = "TRANSPORT_CONNECT"
TRANSPORT_TIMEOUT = "TRANSPORT_TIMEOUT"
TRANSPORT_DROPPED = "TRANSPORT_DROPPED"
BAD_ANSWER = "BAD_ANSWER"
# An HTTP 408, or a 429 that is not Bitrix24's own JSON limit answer: a proxy between us and the portal gave
# up or refused, and the portal behind it may have run the call (or still be running it).
PROXY_TIMEOUT = "HTTP_408"
PROXY_REFUSED = "HTTP_429"
# The call's time budget (the client's deadline) would have run out before an answer: it was not sent.
CALL_DEADLINE = "CALL_DEADLINE"
# HTTP statuses after which the call may have run whatever the body says, unless it is a limit answer.
AMBIGUOUS_STATUSES = frozenset({408, 429})

# Errors a person must fix; retrying only hammers the portal. Source: reference §7 and the clients survey.
PERMANENT = frozenset({
    "NO_AUTH_FOUND", "INVALID_CREDENTIALS", "insufficient_scope", "ACCESS_DENIED", "PORTAL_DELETED",
    "OVERLOAD_LIMIT", "invalid_token", "ERROR_METHOD_NOT_FOUND", "WRONG_AUTH_TYPE", "user_access_error",
    "authorization_error", "INVALID_REQUEST", "PAYMENT_REQUIRED", "ERROR_OAUTH", "APPLICATION_NOT_FOUND",
    "invalid_grant", "invalid_client", "METHOD_CONFIRM_DENIED", "ERROR_BATCH_METHOD_NOT_ALLOWED",
    "ERROR_BATCH_LENGTH_EXCEEDED",
})
# Server-side failures after which the method may or may not have run.
SERVER_FAULTS = frozenset({"INTERNAL_SERVER_ERROR", "ERROR_UNEXPECTED_ANSWER"})


def N_(text: str) -> str:
    """Mark a text for Babel to extract (`make catalogs`); the report translates it where it shows it."""
    return text


# What a person should do, by code; shown in the chat report (translated) and the request status (English).
ADVICE = {
    "NO_AUTH_FOUND": N_("The webhook URL is wrong, expired or deleted: create an incoming webhook and update the "
                        "service's settings."),
    "INVALID_CREDENTIALS": N_("The webhook's user lacks permissions: give them access or use another user's "
                              "webhook."),
    "insufficient_scope": N_("Add the scopes catalog and im to the incoming webhook."),
    "ACCESS_DENIED": N_("The portal refuses REST access (a plan without REST, or the user has no access)."),
    "PORTAL_DELETED": N_("The portal was deleted: remove it from the service's settings."),
    "OVERLOAD_LIMIT": N_("Bitrix24 blocked REST for this portal: contact Bitrix24 support."),
    "invalid_token": N_("The app's token is no longer valid: reinstall the app."),
    "ERROR_METHOD_NOT_FOUND": N_("The portal does not offer this method: check that inventory management (catalog) "
                                 "is available and the scope is granted."),
    "PAYMENT_REQUIRED": N_("The app's paid period is over."),
    "invalid_grant": N_("The app's refresh token is no longer valid: reinstall the app on the portal, or put a new "
                        "refresh_token in the portals file, then replay the request."),
    "OAUTH_TOKEN_LOST": N_("Reinstall the app on the portal, or put a new refresh_token in the portals file, then "
                           "replay the request."),
    "ACCESS_ERROR": N_("The webhook's user is not a member of the report chat: add them to it."),
    "APP_UNINSTALLED": N_("The app was removed from this portal: install it again to process requests."),
    "CHAT_ID": N_("The report chat does not exist: check the chat id in the settings."),
    "USER_NOT_FOUND": N_("The report chat's user does not exist: check the chat id in the settings."),
}


@dataclass
class Bitrix24Error(Exception):
    """A Bitrix24 call that did not succeed.

    `retryable`: sending it again later may succeed. `ambiguous`: the portal may already have
    executed it (timeouts, dropped connections, 5xx, a 408, a proxy's 429, a 2xx without JSON), so nothing
    that depends on its effect happens before it can no longer be running (the ambiguity rule).
    """

    code: str
    description: str
    http_status: int | None
    method: str
    retryable: bool = False
    ambiguous: bool = False
    reset_at: float | None = None

    def __str__(self) -> str:
        status = f" HTTP {self.http_status}" if self.http_status else ""
        return f"{self.method}: {self.code}{status}: {self.description}"

    @property
    def is_business(self) -> bool:
        return self.code == BUSINESS

    @property
    def advice(self) -> str:
        return ADVICE.get(self.code, "")


class Throttled(Exception):
    """The call must wait for a limit (ours or the portal's) longer than a job should sleep."""

    def __init__(self, until: float, reason: str) -> None:
        super().__init__(f"{reason}; resume at {until:.0f}")
        self.until = until
        self.reason = reason


def classify(code: str, description: str, http_status: int | None, method: str) -> Bitrix24Error:
    """Build the error for a Bitrix24 error answer, with its retry class decided by the code first."""
    if code == RATE_LIMITED:
        return Bitrix24Error(code, description, http_status, method, retryable=True)
    if code == OPERATING_LIMITED:
        return Bitrix24Error(code, description, http_status, method, retryable=True)
    if code == EXPIRED_TOKEN:
        return Bitrix24Error(code, description, http_status, method, retryable=True)
    if http_status in AMBIGUOUS_STATUSES:
        return ambiguous_status(http_status, method, f"{code}: {description}")
    if code in PERMANENT:
        return Bitrix24Error(code, description, http_status, method)
    if code in SERVER_FAULTS or (http_status is not None and http_status >= 500):
        return Bitrix24Error(code, description, http_status, method, retryable=True, ambiguous=True)
    return Bitrix24Error(code, description, http_status, method)


def ambiguous_status(http_status: int, method: str, description: str) -> Bitrix24Error:
    """A 408, or a 429 that is no Bitrix24 limit answer: retryable, and the call may have run."""
    code = PROXY_TIMEOUT if http_status == 408 else PROXY_REFUSED
    return Bitrix24Error(code, description, http_status, method, retryable=True, ambiguous=True)
