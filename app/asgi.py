"""The app factory: `litestar --app app.asgi:create_app run`, or any ASGI server with --factory."""

from __future__ import annotations

from litestar import Litestar

from app.server.plugin import EcardPlugin
from app.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> Litestar:
    """A Litestar app for settings (default: from the environment)."""
    return Litestar(plugins=[EcardPlugin(settings or get_settings())])
