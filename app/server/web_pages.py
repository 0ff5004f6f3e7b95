"""Static routes for the two browser clients: `/app/` (the holder), `/gate/` (a terminal) and `/web/` (shared assets).

They are plain files under `app/web/` with no build step. Each answer carries a strict
Content-Security-Policy (scripts and styles from this origin only, nothing inline), so a page
cannot be made to run injected code or talk to another host; none of them is part of the API
document, and none adds middleware to the API's routes.
"""

from __future__ import annotations

from pathlib import Path

from litestar import Router
from litestar.datastructures import CacheControlHeader
from litestar.response.base import ASGIResponse
from litestar.static_files import create_static_files_router
from litestar.types import AfterRequestHookHandler, ASGIApp

WEB_DIR = Path(__file__).resolve().parents[1] / "web"

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        # QR images arrive as blobs; the (empty) favicon is a data URL.
        "img-src 'self' blob: data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
_COMMON_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
# The gate console may use the camera; the holder's page never needs it.
HOLDER_HEADERS = {**_COMMON_HEADERS, "Permissions-Policy": "camera=(), microphone=(), geolocation=()"}
GATE_HEADERS = {**_COMMON_HEADERS, "Permissions-Policy": "camera=(self), microphone=(), geolocation=()"}

# Revalidate every time: a deployment's new page must not meet an old cached script.
_REVALIDATE = CacheControlHeader(no_cache=True)


def _with_headers(headers: dict[str, str]) -> AfterRequestHookHandler:
    async def add_headers(response: ASGIApp) -> ASGIApp:
        if isinstance(response, ASGIResponse):
            for name, value in headers.items():
                response.headers[name] = value
        return response

    return add_headers


def _pages(path: str, directory: Path, headers: dict[str, str], name: str) -> Router:
    return create_static_files_router(
        path,
        directories=[directory],
        html_mode=True,
        name=name,
        cache_control=_REVALIDATE,
        after_request=_with_headers(headers),
        include_in_schema=False,
    )


def web_routers() -> list[Router]:
    """The holder's page at `/app/`, the gate console at `/gate/`, their shared files at `/web/`."""
    return [
        _pages("/app", WEB_DIR / "holder", HOLDER_HEADERS, "web-holder"),
        _pages("/gate", WEB_DIR / "gate", GATE_HEADERS, "web-gate"),
        create_static_files_router(
            "/web",
            directories=[WEB_DIR / "shared"],
            name="web-shared",
            cache_control=_REVALIDATE,
            after_request=_with_headers(_COMMON_HEADERS),
            include_in_schema=False,
        ),
    ]
