"""JSON responses without Flask's per-call overhead (the hot path answers over a thousand a second)."""

from __future__ import annotations

import json
from typing import Any

from werkzeug.wrappers import Response


def json_response(payload: Any, status: int = 200) -> Response:
    """A JSON response; non-ASCII is escaped as PHP's json_encode does by default."""
    return Response(json.dumps(payload), status=status, mimetype="application/json")


def control_error(description: str, status: int = 400) -> Response:
    """An error of the control API (not a Bitrix24 answer)."""
    return json_response({"error": "SANDBOX_BAD_REQUEST" if status == 400 else "SANDBOX_NOT_FOUND",
                          "error_description": description}, status)
