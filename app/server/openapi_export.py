"""The OpenAPI document as committed under openapi/ (`make openapi` writes it, a test compares)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from app.asgi import create_app
from app.settings import PROJECT_ROOT, Settings

OPENAPI_PATH = PROJECT_ROOT / "openapi" / "openapi.json"


def openapi_document() -> dict[str, Any]:
    """The app's OpenAPI document as plain JSON data (building the app connects to nothing)."""
    app = create_app(Settings())
    document: dict[str, Any] = json.loads(json.dumps(app.openapi_schema.to_schema()))
    return document


def write(path: Path = OPENAPI_PATH) -> None:
    """Write the document, keys sorted, so diffs stay small."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(openapi_document(), indent=2, sort_keys=True, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else OPENAPI_PATH)
