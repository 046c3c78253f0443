"""The service's own words about an outcome, as records keep them (English, for the status API and logs).

The chat report translates them (`translated`): each is marked for the catalogs here, where it is defined.
Anything else in a detail is the portal's own text and is shown as the portal wrote it.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from jobs.i18n import N_

NOT_VISIBLE = N_("the document is not visible to the webhook user")
NO_SUCH_NUMBER = N_("no document with this number is visible to the webhook user")
PORTAL_GONE = N_("the portal is no longer configured in the service")
APP_GONE = N_("the app was uninstalled from the portal")
CONFIRMED_BY_READ = N_("confirmed by re-reading once the unanswered call could no longer be running")
PORTAL_REFUSED = N_("the portal refused")
UNANSWERED = N_("the last cancel got no answer: check the document in the portal")
OWN_DETAILS = frozenset({NOT_VISIBLE, NO_SUCH_NUMBER, PORTAL_GONE, APP_GONE, CONFIRMED_BY_READ, PORTAL_REFUSED})

# Templates: a job that failed outside its own handling (jobs/hooks.py), an event whose object was not read
# (jobs/resolve.py). Their values are names and the portal's own error text.
STOPPED = N_("the `{stage}` job stopped ({why}); it is in the failed registry for `rq requeue`")
READ_FAILED = N_("reading the event's object: {error}")
TEMPLATES = (STOPPED, READ_FAILED)


def _pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)
    return re.compile("".join(re.escape(part) if index % 2 == 0 else f"(?P<{part}>.+)"
                              for index, part in enumerate(parts)), re.DOTALL)


_PATTERNS = [(template, _pattern(template)) for template in TEMPLATES]


def translated(detail: str, gettext: Callable[[str], str]) -> str | None:
    """The detail in the report's language when it is one of ours (None: it is the portal's own text)."""
    if detail in OWN_DETAILS:
        return gettext(detail)
    for template, pattern in _PATTERNS:
        match = pattern.fullmatch(detail)
        if match:
            return gettext(template).format(**match.groupdict())
    return None
