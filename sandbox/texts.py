"""Localized error texts of the catalog module, keyed by message id.

English texts are the ones the Bitrix24 REST docs print (they differ slightly from the core's own
English language file). Russian texts come from the core's Russian language file where it has them
(`catalog/lang/ru/lib/controller/document.php`) and are our own translation otherwise.
REST-core and chat errors are English in both languages, as Bitrix24 hard-codes them.
"""

from __future__ import annotations

import html

MESSAGES: dict[str, dict[str, str]] = {
    "NO_RIGHTS": {
        "en": "Insufficient permissions to save the document",
        "ru": "Недостаточно прав для сохранения документа",
    },
    "NO_RIGHTS_CONDUCT": {
        "en": "Insufficient rights to save the document",
        "ru": "Недостаточно прав для сохранения документа",
    },
    "NO_STORE_RIGHTS": {
        "en": "Could not complete the action as you do not have sufficient permissions "
              "to view and select warehouses",
        "ru": "Не удалось завершить действие, так как у вас недостаточно прав для просмотра "
              "и выбора складов",
    },
    "MANAGEMENT_NOT_ENABLED": {
        "en": "To process the document, inventory accounting must be enabled",
        "ru": "Для проведения документа необходимо включить складской учёт",
    },
    "CONDUCT_MANAGEMENT_NOT_ENABLED": {
        "en": "Warehouse accounting must be enabled to conduct the document",
        "ru": "Для проведения документа необходимо включить складской учёт",
    },
    "PLAN_RESTRICTED": {
        "en": "Inventory accounting is not available on your plan",
        "ru": "Складской учёт недоступен на вашем тарифе",
    },
    "CONDUCT_PLAN_RESTRICTED": {
        "en": "Warehouse accounting is not available on your plan",
        "ru": "Складской учёт недоступен на вашем тарифе",
    },
    "CANCEL_NOT_CONDUCTED": {
        "en": "Error cancelling document conduct: Document has not been conducted yet",
        "ru": "Ошибка отмены проведения документа: Документ еще не проведен",
    },
    "CONDUCT_ALREADY_CONDUCTED": {
        "en": 'Document conducting error: "Document has already been conducted"',
        "ru": "Ошибка проведения документа: Документ уже проведен",
    },
    "LIST_CANCEL_NOT_FOUND": {
        "en": "Error canceling the document: Document not found",
        "ru": "Ошибка отмены проведения документа: Документ не найден.",
    },
    "LIST_CANCEL_NO_RIGHTS": {
        "en": 'An error occurred while canceling the document "{title}": '
              "Insufficient permissions to save the document",
        "ru": 'При отмене документа "{title}" произошла ошибка: '
              "Недостаточно прав для сохранения документа",
    },
    "LIST_CANCEL_NOT_CONDUCTED": {
        "en": 'An error occurred while canceling the document "{title}": '
              "The document has not been processed yet",
        "ru": 'При отмене документа "{title}" произошла ошибка: Документ еще не проведен',
    },
    "LIST_CONDUCT_NOT_FOUND": {
        "en": "Error conducting the document: Document not found",
        "ru": "Ошибка проведения документа: Документ не найден.",
    },
    "LIST_CONDUCT_NO_RIGHTS": {
        "en": 'An error occurred while conducting the document "{title}": '
              "Insufficient permissions to save the document",
        "ru": 'При проведении документа "{title}" произошла ошибка: '
              "Недостаточно прав для сохранения документа",
    },
    "LIST_CONDUCT_ALREADY_CONDUCTED": {
        "en": 'An error occurred while conducting the document "{title}": '
              "Document has already been conducted",
        "ru": 'При проведении документа "{title}" произошла ошибка: Документ уже проведен',
    },
    "MODE_ACCESS_DENIED": {
        "en": "Access denied",
        "ru": "Доступ запрещен",
    },
}

# Names shown instead of an empty title, as `StoreDocumentTable::getTypeList` gives them.
DOC_TYPE_NAMES: dict[str, dict[str, str]] = {
    "A": {"en": "Arrival", "ru": "Приход"},
    "S": {"en": "Store adjustment", "ru": "Оприходование"},
    "M": {"en": "Moving", "ru": "Перемещение"},
    "R": {"en": "Return", "ru": "Возврат"},
    "D": {"en": "Write-off", "ru": "Списание"},
}


def text(message_id: str, language: str, **values: str) -> str:
    """The message in the portal language (English when the language has no text)."""
    texts = MESSAGES[message_id]
    template = texts.get(language) or texts["en"]
    return template.format(**values) if values else template


def document_title(document: dict, language: str) -> str:
    """The title as the list methods quote it: HTML-escaped, or the type name when empty."""
    title = document.get("title") or DOC_TYPE_NAMES.get(document.get("docType", ""), {}).get(language, "")
    # Bitrix runs the title through htmlspecialcharsbx (ENT_COMPAT: double quotes, not single).
    return html.escape(str(title), quote=False).replace('"', "&quot;")
