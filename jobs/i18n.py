"""The report texts' translations: gettext catalogs under jobs/locale, one per report language.

The catalogs are managed with Babel (`make catalogs`: extract, update, compile); the compiled `.mo` files
are committed beside their `.po` sources, so a clone or a deployment needs no build step, and a test
compiles every `.po` again and fails when a committed `.mo` differs from it. English is the source
language: its texts are the message ids themselves.
"""

from __future__ import annotations

import gettext
from functools import cache
from pathlib import Path

from settings import LANGUAGES

LOCALE_DIR = Path(__file__).resolve().parent / "locale"
DOMAIN = "messages"


def N_(text: str) -> str:
    """Mark a text for translation where it is defined; it is translated where it is shown."""
    return text


@cache
def catalog(language: str) -> gettext.NullTranslations:
    """The compiled catalog of a report language (a missing one is an error, never a silent English)."""
    if language not in LANGUAGES:
        raise ValueError(f"no report language {language!r}")
    if language == "en":
        return gettext.NullTranslations()
    return gettext.translation(DOMAIN, LOCALE_DIR, languages=[language])
