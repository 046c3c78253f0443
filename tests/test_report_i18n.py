"""The chat report in every language, rendered from the compiled catalogs: clean lines, no English left in a
translated report, mentions exactly where a person must act, coloured counts, and catalogs that match the code.

Pure logic (the render function and the catalog files); the report posted over real processes is in
tests/test_report_threads.py.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import pytest
from babel.messages.extract import DEFAULT_KEYWORDS, extract_from_dir
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po

from bitrix24.errors import ADVICE
from jobs import details, report
from jobs.i18n import LOCALE_DIR, catalog
from sandbox.texts import MESSAGES as SANDBOX_TEXTS
from settings import LANGUAGES, Portal, SettingsError, load_settings

ROOT = Path(__file__).resolve().parent.parent
WEBHOOK = "https://shop.bitrix24.com/rest/1/abc123secret/"
TRANSLATED = [language for language in LANGUAGES if language != "en"]
# Portal-given texts in the records below: left as the portal wrote them, and ignored by the English check.
PORTAL_TITLE = "Adjustment 5: desk lamps"
PORTAL_REFUSAL = "Insufficient permissions to save the document"
PORTAL_FAILURE = "INTERNAL_SERVER_ERROR: Internal server error"
REASON = "RMA-1 returned"
READ_ERROR = "crm.item.get: NOT_FOUND HTTP 400: Element not found"
BB_TAGS = re.compile(r"\[/?([a-z]+)(?:=[^\]]*)?\]", re.IGNORECASE)
ALLOWED_TAGS = {"b", "color", "url", "user"}  # all in the reference's §6 list


def portal(language: str, mention: str = "responsible") -> Portal:
    return Portal(name="shop", webhook_url=WEBHOOK, chat="chat1", language=language,  # type: ignore[arg-type]
                  mention=mention)  # type: ignore[arg-type]


def every_outcome() -> dict[str, Any]:
    """A record with each outcome, a document named by number, an unanswered failure and a failure with advice."""
    docs = [
        {"id": 1, "outcome": "cancelled", "title": "Arrival 1", "docType": "A", "responsibleId": 11},
        {"id": 2, "outcome": "already_not_conducted", "title": "Moving 2", "docType": "M", "detail": "status C",
         "responsibleId": 12},
        {"id": 3, "outcome": "not_found", "detail": details.NOT_VISIBLE},
        {"id": None, "number": "DOC-0404", "outcome": "not_found", "detail": details.NO_SUCH_NUMBER},
        {"id": 5, "outcome": "refused", "title": PORTAL_TITLE, "docType": "S", "detail": PORTAL_REFUSAL,
         "responsibleId": 15},
        {"id": 6, "outcome": "failed", "title": "Return 6", "docType": "R", "responsibleId": 16,
         "detail": f"{PORTAL_FAILURE} ({details.UNANSWERED})"},
        {"id": 7, "outcome": "failed", "title": "Write-off 7", "docType": "D", "responsibleId": 17,
         "detail": "NO_AUTH_FOUND: Wrong authorization data", "advice": ADVICE["NO_AUTH_FOUND"]},
        {"id": 8, "outcome": None, "title": "Arrival 8", "docType": "A", "responsibleId": 18},
        {"id": 9, "outcome": "failed", "title": "Arrival 9", "docType": "A", "detail": details.PORTAL_GONE},
        {"id": 10, "outcome": "failed", "responsibleId": 20,
         "detail": details.STOPPED.format(stage="cancel", why="JobTimeoutException") + f" ({details.UNANSWERED})"},
    ]
    return {"id": "f" * 32, "request": {"portal": "shop", "source": "robot", "reason": REASON,
                                         "external_id": "RMA-1"}, "documents": docs}


def words(text: str) -> set[str]:
    return {word.lower() for word in re.findall(r"[A-Za-z]{4,}", text)}


def catalog_words(language: str) -> set[str]:
    """Every Latin word the language's own catalog uses (technical names such as `catalog`, cognates)."""
    with open(LOCALE_DIR / language / "LC_MESSAGES" / "messages.po", "rb") as f:
        po = read_po(f)
    found: set[str] = set()
    for message in po:
        strings = message.string if isinstance(message.string, tuple) else (message.string,)
        for string in strings:
            found |= words(str(string or ""))
    return found


def english_words() -> set[str]:
    """Every word of the English texts (the catalog template's message ids)."""
    with open(LOCALE_DIR / "messages.pot", "rb") as f:
        ids = [m.id for m in read_po(f) if m.id]
    return set().union(*(words(mid if isinstance(mid, str) else " ".join(mid)) for mid in ids))


ENGLISH_WORDS = english_words()


def without_portal_text(text: str) -> str:
    """The report minus what came from outside (titles, the portal's words, the reason), BB codes and the nonce."""
    for given in (PORTAL_TITLE, PORTAL_REFUSAL, PORTAL_FAILURE, "Wrong authorization data", REASON, "NO_AUTH_FOUND",
                  "Arrival 1", "Moving 2", "Return 6", "Write-off 7", "Arrival 8", "Arrival 9", "RMA-1", "n0nce",
                  "JobTimeoutException", READ_ERROR, "ONCRMDEALUPDATE"):
        text = text.replace(given, "")
    text = re.sub(r"`[^`]*`", "", text)  # names an operator types: the `cancel` job, `rq requeue`
    return BB_TAGS.sub("", text)


def document_blocks(text: str) -> dict[str, list[str]]:
    """Each document's line and the detail lines under it, by the document's label (#id or number)."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("• "):
            label = re.search(r"#\d+|DOC-\d+", line)
            assert label, line
            current = blocks.setdefault(label.group(0), [line])
        elif line.startswith(report.INDENT) and current is not None:
            current.append(line)
        else:
            current = None
    return blocks


# ---- catalogs ----------------------------------------------------------------------------------------------

def test_the_committed_catalogs_are_compiled_from_their_sources_and_cover_the_code() -> None:
    # as `make catalogs` extracts them (babel.cfg, `-k N_`)
    found = extract_from_dir(str(ROOT), method_map=[("jobs/**.py", "python"), ("bitrix24/**.py", "python")],
                             keywords={**DEFAULT_KEYWORDS, "N_": None})
    extracted = {message if isinstance(message, str) else message[0] for _, _, message, _, _ in found}
    with open(LOCALE_DIR / "messages.pot", "rb") as f:
        template = {m.id if isinstance(m.id, str) else m.id[0] for m in read_po(f) if m.id}
    assert extracted == template, "run `make catalogs`: the template differs from the code"
    for language in TRANSLATED:
        source = LOCALE_DIR / language / "LC_MESSAGES" / "messages.po"
        with open(source, "rb") as f:
            po = read_po(f, locale=language)
        ids = {m.id if isinstance(m.id, str) else m.id[0] for m in po if m.id}
        assert ids == template, f"{language}: run `make catalogs`"
        for message in po:
            if not message.id:
                continue
            strings = message.string if isinstance(message.string, tuple) else (message.string,)
            assert all(strings) and "fuzzy" not in message.flags, f"{language}: {message.id!r} is not translated"
        compiled = io.BytesIO()
        write_mo(compiled, po)
        assert (source.with_suffix(".mo")).read_bytes() == compiled.getvalue(), \
            f"{language}: messages.mo is not compiled from messages.po: run `make catalogs`"


def test_plural_forms_follow_each_language() -> None:
    more = {n: catalog("ru").ngettext("and {n} more document: see the request status",
                                      "and {n} more documents: see the request status", n).format(n=n)
            for n in (1, 3, 5, 21)}
    assert more == {1: "и ещё 1 документ: см. статус запроса", 3: "и ещё 3 документа: см. статус запроса",
                    5: "и ещё 5 документов: см. статус запроса", 21: "и ещё 21 документ: см. статус запроса"}
    assert "dokumenty" in catalog("pl").ngettext("and {n} more document: see the request status",
                                                 "and {n} more documents: see the request status", 3)


# ---- every outcome in every language ---------------------------------------------------------------------

@pytest.mark.parametrize("language", LANGUAGES)
def test_every_outcome_renders_with_its_parts_on_lines_of_their_own(language: str) -> None:
    _ = catalog(language).gettext
    text = report.render(every_outcome(), portal(language), 2, "n0nce")
    blocks = document_blocks(text)
    assert set(blocks) == {"#1", "#2", "#3", "DOC-0404", "#5", "#6", "#7", "#8", "#9", "#10"}
    outcome = {label: _(report.OUTCOME_NAMES[o]) for label, o in
               [("#1", "cancelled"), ("#2", "already_not_conducted"), ("#3", "not_found"), ("DOC-0404", "not_found"),
                ("#5", "refused"), ("#6", "failed"), ("#7", "failed"), ("#8", "pending"), ("#9", "failed"),
                ("#10", "failed")]}
    for label, lines in blocks.items():
        assert lines[0].endswith("[/color][/b]") and f"{outcome[label]}[/color][/b]" in lines[0], lines[0]
        for detail in lines[1:]:
            head, sep, said = detail[len(report.INDENT):].partition(": ")
            assert sep and head and said, detail
            assert re.search(r"[.!?…](?:[\"'»”’)]|&quot;)*$", detail.replace("[/user]", ".")), detail
            assert ".." not in detail.replace("...", "") and " ." not in detail, detail
    todo, answered, error = _("What to do"), _("Bitrix24 answered"), _("Error")
    assert blocks["#1"] == blocks["#1"][:1] and blocks["#2"] == blocks["#2"][:1] and len(blocks["#8"]) == 1
    assert blocks["#5"][1] == f"{report.INDENT}{answered}: {PORTAL_REFUSAL}."
    assert blocks["#5"][2] == f"{report.INDENT}{todo}: {_(report.REFUSED_HINT)}"
    assert blocks["#3"][1:] == [f"{report.INDENT}{todo}: {_(report.NOT_FOUND_HINT)}"]  # our own detail: not repeated
    assert blocks["#6"][1] == f"{report.INDENT}{error}: {PORTAL_FAILURE}."
    note = _(details.UNANSWERED)
    assert blocks["#6"][2] == f"{report.INDENT}{note[:1].upper()}{note[1:]}."
    assert blocks["#7"][2] == f"{report.INDENT}{todo}: {_(ADVICE['NO_AUTH_FOUND'])}"
    gone = _(details.PORTAL_GONE)
    assert blocks["#9"][1] == f"{report.INDENT}{error}: {gone[:1].upper()}{gone[1:]}."
    stopped = _(details.STOPPED).format(stage="cancel", why="JobTimeoutException")
    assert blocks["#10"][1:3] == [f"{report.INDENT}{error}: {stopped[:1].upper()}{stopped[1:]}.",
                                  f"{report.INDENT}{note[:1].upper()}{note[1:]}."]
    kinds = [_(report.DOC_TYPES[t]) for t in "ASMRD"]
    assert all(f"({kind}): " in text for kind in kinds)
    assert text.splitlines()[-1] == report.request_line("f" * 32, 2, "n0nce", language)


@pytest.mark.parametrize("language", TRANSLATED)
def test_a_translated_report_has_no_english_left_but_the_portals_own_words(language: str) -> None:
    text = without_portal_text(report.render(every_outcome(), portal(language), 2, "n0nce"))
    leftovers = words(text) & ENGLISH_WORDS - catalog_words(language)
    assert not leftovers, f"{language}: English words in the report: {sorted(leftovers)}\n{text}"
    english = without_portal_text(report.render(every_outcome(), portal("en"), 2, "n0nce"))
    assert len(words(english) & ENGLISH_WORDS) > 40  # the check above would see English if it were there


@pytest.mark.parametrize("language", LANGUAGES)
def test_mentions_go_exactly_to_the_responsible_users_of_refused_and_failed_documents(language: str) -> None:
    text = report.render(every_outcome(), portal(language), 1, "n0nce")
    assert re.findall(r"\[user=(\d+)\]", text) == ["15", "16", "17", "20"]  # refused 5, failed 6, 7, 10 (9: no one)
    blocks = document_blocks(text)
    for label in ("#5", "#6", "#7", "#10"):
        assert sum("[user=" in line for line in blocks[label]) == 1 and "[user=" in blocks[label][-1]
    quiet = report.render(every_outcome(), portal(language, mention="none"), 1, "n0nce")
    assert "[user=" not in quiet
    all_good = {**every_outcome(), "documents": every_outcome()["documents"][:2]}
    assert "[user=" not in report.render(all_good, portal(language), 1, "n0nce")


@pytest.mark.parametrize("language", LANGUAGES)
def test_the_first_line_colours_each_count_and_only_listed_bb_codes_are_used(language: str) -> None:
    _ = catalog(language).gettext
    text = report.render(every_outcome(), portal(language), 1, "n0nce")
    first = text.splitlines()[0]
    expected = [("cancelled", report.GREEN, 1), ("already_not_conducted", report.GREY, 1),
                ("not_found", report.GREY, 2), ("refused", report.RED, 1), ("failed", report.RED, 4),
                ("pending", report.GREY, 1)]
    assert first.startswith("[b]" + _("Cancelling inventory documents: some need attention") + "[/b] (")
    for name, colour, count in expected:
        assert f"[color={colour}]{_(report.OUTCOME_NAMES[name])}: {count}[/color]" in first
    assert {tag.lower() for tag in BB_TAGS.findall(text)} <= ALLOWED_TAGS
    assert text.count("[color=") == text.count("[/color]") and text.count("[b]") == text.count("[/b]")


def event_failed() -> dict[str, Any]:
    return {"id": "e" * 32, "documents": [], "error": details.READ_FAILED.format(error=READ_ERROR),
            "request": {"portal": "shop", "source": "event", "event": "ONCRMDEALUPDATE", "object_id": 77},
            "resolution": {"event": "ONCRMDEALUPDATE", "object_id": 77, "link_key": "crm.item.get:2"}}


@pytest.mark.parametrize("language", LANGUAGES)
def test_an_event_whose_object_was_not_read_is_reported_in_the_language_with_the_portals_words(language: str) -> None:
    _ = catalog(language).gettext
    text = report.render(event_failed(), portal(language), 1, "n0nce")
    lines = text.splitlines()
    said = _(details.READ_FAILED).format(error=READ_ERROR)
    assert lines[0] == "[b]" + _("Could not read the object of a Bitrix24 event") + "[/b]"
    assert lines[1] == _("Error") + f": {said[:1].upper()}{said[1:]}."
    assert lines[2] == _("What to do") + ": " + _(report.EVENT_FAILED_HINT)
    assert "[url=https://shop.bitrix24.com/crm/deal/details/77/]ONCRMDEALUPDATE 77[/url]" in text
    if language != "en":
        leftovers = words(without_portal_text(text)) & ENGLISH_WORDS - catalog_words(language)
        assert not leftovers, f"{language}: English words in the report: {sorted(leftovers)}\n{text}"


# ---- clean lines for every text the sandbox portal knows ---------------------------------------------------

SANDBOX_TEXTS_ALL = [(mid, lang, template) for mid, texts in SANDBOX_TEXTS.items() for lang, template in texts.items()]


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("message_id, portal_language, template", SANDBOX_TEXTS_ALL,
                         ids=[f"{m}-{lang}" for m, lang, _ in SANDBOX_TEXTS_ALL])
def test_each_sandbox_business_error_text_is_a_sentence_of_its_own(
        language: str, message_id: str, portal_language: str, template: str) -> None:
    portal_text = template.format(title="Adjustment 5: &quot;lamps&quot;") if "{title}" in template else template
    docs = [{"id": 5, "outcome": "refused", "title": "T", "docType": "S", "detail": portal_text, "responsibleId": 2},
            {"id": 6, "outcome": "not_found", "detail": portal_text},
            {"id": 7, "outcome": "failed", "detail": f"0: {portal_text}", "responsibleId": 3}]
    text = report.render({"id": "a" * 32, "request": {"portal": "shop", "source": "api"}, "documents": docs},
                         portal(language), 1, "n0nce")
    blocks = document_blocks(text)
    _ = catalog(language).gettext
    bare = portal_text.rstrip(" .")
    for label, head in (("#5", _("Bitrix24 answered")), ("#6", _("Bitrix24 answered")), ("#7", _("Error"))):
        said = blocks[label][1]
        assert said.startswith(f"{report.INDENT}{head}: ") and bare in said, said
        # exactly one sentence end, right after the portal's words, whatever they ended with
        tail = said[said.index(bare) + len(bare):]
        assert tail in (".", '".', ".&quot;") or (tail == "" and said.endswith((".", "!", "?"))), (portal_text, said)
        assert blocks[label][2].startswith(f"{report.INDENT}{_('What to do') if label != '#7' else _('Responsible')}")


# ---- settings -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("given, language", [*((code, code) for code in LANGUAGES), ("DE", "de"), ("ua", "uk"),
                                             ("la", "es"), ("br", "pt")])
def test_b24_language_takes_each_report_language_and_bitrix24s_own_codes(given: str, language: str) -> None:
    settings = load_settings(_env_file=None, b24_webhook_url=WEBHOOK, b24_chat_id="chat1", b24_language=given)
    assert settings.portal(None).language == language  # type: ignore[union-attr]


@pytest.mark.parametrize("name, value", [("b24_language", "fr"), ("b24_language", "english"),
                                         ("b24_mention", "everyone")])
def test_an_unknown_language_or_mention_is_refused_at_start(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name.upper()):
        load_settings(_env_file=None, b24_webhook_url=WEBHOOK, b24_chat_id="chat1", **{name: value})


def test_the_portals_file_takes_language_and_mention_per_portal(tmp_path: Path) -> None:
    path = tmp_path / "portals.toml"
    path.write_text(f'[portals.lager]\nwebhook_url = "{WEBHOOK}"\nchat = "chat1"\nlanguage = "ua"\n'
                    f'mention = "none"\n[portals.shop]\nwebhook_url = "{WEBHOOK}"\nchat = "chat2"\nlanguage = "pl"\n')
    settings = load_settings(_env_file=None, b24_portals_file=str(path))
    lager, shop = settings.portal("lager"), settings.portal("shop")
    assert lager is not None and (lager.language, lager.mention) == ("uk", "none")
    assert shop is not None and (shop.language, shop.mention) == ("pl", "responsible")
    path.write_text(f'[portals.lager]\nwebhook_url = "{WEBHOOK}"\nchat = "chat1"\nlanguage = "fr"\n'
                    f'mention = "all"\n')
    with pytest.raises(SettingsError) as info:
        load_settings(_env_file=None, b24_portals_file=str(path))
    assert "portals.lager.language" in str(info.value) and "portals.lager.mention" in str(info.value)
